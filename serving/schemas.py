"""What the service answers, typed: the OpenAPI page shows these schemas and their examples."""
from __future__ import annotations

from pydantic import BaseModel, Field


def _model():
    return Field(description="The registered backbone that answered (`models:/<name>/<version>`)",
                 examples=["models:/demo-backbone/3"])


def _head_model():
    return Field(description="The registered head that answered", examples=["models:/demo-head/2"])


class OODScore(BaseModel):
    score: float = Field(description="Distance of the image's embedding to its k-th nearest reference image (in the "
                                     "reference's PCA space of L2-normalised embeddings)", examples=[0.41])
    percentile: float = Field(description="Share of the reference's own leave-one-out distances at or below `score`, "
                                          "0-100", examples=[62.5])
    in_distribution: bool = Field(description="`percentile` at or below the reference's threshold")


class OOD(BaseModel):
    reference: str | None = Field(description="The promotion service's evaluation run whose reference the images are "
                                              "scored against; null when the backbone has none",
                                  examples=["3f2a9c0d41e84b6f9a7d5c2e1b0a9f87"])
    threshold_percentile: float | None = Field(description="Percentile beyond which an image is out of distribution",
                                               examples=[99.0])
    window: int = Field(description="Images per window of the two-sample test the service runs on what it is sent "
                                    "(VF_WATCH_WINDOW)", examples=[100])
    scores: list[OODScore] = Field(description="One per image, in order; empty without a reference")
    note: str = Field(description="Why there is no reference (empty with one)", examples=[""])


def _ood():
    return Field(description="How far each image lies from what the backbone was evaluated on (out of distribution)")


class Embeddings(BaseModel):
    model: str = _model()
    dim: int = Field(description="Length of each embedding", examples=[384])
    embeddings: list[list[float]] = Field(description="One CLS embedding of the EMA teacher per image, in order",
                                          examples=[[[0.12, -0.03, 0.88]]])
    ood: OOD = _ood()


class ClassPrediction(BaseModel):
    label: str = Field(examples=["glands"])
    confidence: float = Field(description="Probability of `label`", examples=[0.93])
    probabilities: dict[str, float] = Field(description="Every class's probability",
                                            examples=[{"adipose": 0.01, "glands": 0.93, "stroma": 0.06}])


class Classification(BaseModel):
    model: str = _head_model()
    backbone: str = _model()
    head: str = Field(description="The probe that answered (the `head` asked for, else the default)",
                      examples=["linear"])
    predictions: list[ClassPrediction] = Field(description="One per image, in order")
    ood: OOD = _ood()


class Regression(BaseModel):
    model: str = _head_model()
    target: str = Field(description="What the values estimate", examples=["structure_fraction"])
    predictions: list[float] = Field(description="One value per image, in order", examples=[[0.42]])
    ood: OOD = _ood()


class Mask(BaseModel):
    width: int = Field(description="Of the image as seen (EXIF orientation applied)", examples=[224])
    height: int = Field(examples=[224])
    mask_png: str = Field(description="Class index per pixel, a greyscale PNG at the image's size, base64",
                          examples=["iVBORw0KGgoAAAANSUhEUgAA..."])
    fractions: dict[str, float] = Field(description="Area fraction of each class",
                                        examples=[{"background": 0.7, "structure": 0.3}])


class Segmentation(BaseModel):
    model: str = _head_model()
    classes: list[str] = Field(description="Class of each mask value", examples=[["background", "structure"]])
    predictions: list[Mask] = Field(description="One per image, in order")
    ood: OOD = _ood()


class AttentionMaps(BaseModel):
    maps: list[list[list[float]]] = Field(description="Per attention head, the CLS token's attention over the "
                                                      "patch grid (each map sums to 1)")
    mean_png: str = Field(description="The mean map over heads as a greyscale PNG, base64",
                          examples=["iVBORw0KGgoAAAANSUhEUgAA..."])


class Attention(BaseModel):
    model: str = _model()
    grid: list[int] = Field(description="Patch grid (rows, columns)", examples=[[16, 16]])
    predictions: list[AttentionMaps] = Field(description="One per image, in order")
    ood: OOD = _ood()


class Reloaded(BaseModel):
    changed: bool = Field(description="Whether a new set was swapped in")
    backbone: str | None = _model()
    head: str | None = _head_model()


class SlideUpload(BaseModel):
    slide_id: str = Field(description="What `/predict_slide` takes; the slide is kept VF_UPLOAD_RETENTION_S (a day)",
                          examples=["4f0c7d2e9a1b4c3d8e7f6a5b4c3d2e1f"])
    name: str = Field(examples=["CMU-1.svs"])
    bytes: int = Field(examples=[1938955])
    md5: str = Field(description="Of the file as received", examples=["ed92d5a9f2e86df67640d6f92ce3e231"])
    width: int = Field(description="Level-0 pixels", examples=[46000])
    height: int = Field(examples=[32914])
    objective_power: float = Field(examples=[20.0])


class SlidePrediction(BaseModel):
    model: str = _head_model()
    backbone: str = _model()
    slide_id: str
    summary: dict = Field(description="The slide's aggregates: tiles and tissue area, class fractions, sum and mean of "
                                      "the regression, segmented area per class, the tiling used",
                          examples=[{"tiles": 587, "tissue_area_mm2": 0.6, "class_fractions": {"glands": 0.36}}])
    regions: dict | None = Field(description="GeoJSON FeatureCollection in level-0 pixels (QuPath: File > Import "
                                             "objects): adjacent tiles of a class merged into polygons")
    segmentation: dict | None = Field(description="GeoJSON FeatureCollection of the segmentation head's masks")
    heatmap_png: str | None = Field(description="The classes over the slide's thumbnail with a legend, PNG, base64")
    tiles_csv: str = Field(description="One row per tile: level-0 x, y, side, tissue fraction, class and probabilities, "
                                       "regression value, segmented area fractions")


class SeriesUpload(BaseModel):
    series_id: str = Field(description="What `/predict_series` takes; kept VF_UPLOAD_RETENTION_S (a day)",
                           examples=["9a1b4c3d8e7f6a5b4c3d2e1f4f0c7d2e"])
    name: str = Field(examples=["patient7-calcium.zip"])
    bytes: int = Field(examples=[52428800])
    md5: str = Field(description="Of the zip as received", examples=["0d6f3c2a4b5e6f708192a3b4c5d6e7f8"])
    series: dict = Field(description="The series in patient geometry: slices, size, pixel spacing, thickness, positions",
                         examples=[{"slices": 64, "rows": 512, "columns": 512, "pixel_spacing_mm": [0.4, 0.4],
                                    "slice_thickness_mm": 3.0}])


class SeriesPrediction(BaseModel):
    model: str = _head_model()
    backbone: str = _model()
    series_id: str
    summary: dict = Field(description="The series' geometry and, with a score, its total, category and lesion count",
                          examples=[{"score": {"name": "agatston", "total": 122.0, "category": "101-400", "lesions": 4}}])
    slices_csv: str = Field(description="One row per slice: position, class and probabilities, regression value, "
                                        "segmented area fractions")
    lesions_csv: str | None = Field(description="The score's lesion list (slice, position, box, area, peak HU, "
                                                "weight, score)")
