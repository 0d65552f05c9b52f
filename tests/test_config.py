import pytest

from dinomx.config import ConfigError, DinoMXConfig, StudentConfig
from tests.conftest import REPO


def test_demo_config_loads_and_flattens():
    cfg = DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml")
    flat = cfg.flat()
    assert flat["train.batch_size"] == 32
    assert flat["crops.local_crops_number"] == 4
    assert flat["crops.global_crops_scale"] == [0.4, 1.0]
    assert cfg.total_steps == cfg.train.epochs * cfg.train.steps_per_epoch
    assert len(cfg.sha256()) == 64


def test_round_trip_through_yaml(tmp_path):
    cfg = DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml", ["optim.lr=0.002"])
    cfg.to_yaml(tmp_path / "c.yaml")
    again = DinoMXConfig.from_yaml(tmp_path / "c.yaml")
    assert again == cfg and again.optim.lr == 0.002


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"batch_sise": 3}}, "c.yaml: train: unknown key 'batch_sise'"),
        ({"trian": {}}, "c.yaml: unknown key 'trian'"),
        ({"optim": {"lr": "fast"}}, "c.yaml: optim.lr: expected a number, got 'fast'"),
        ({"train": {"epochs": 1.5}}, "c.yaml: train.epochs: expected an integer, got 1.5"),
        ({"student": {"arch": "resnet"}}, "c.yaml: student.arch: expected one of"),
        ({"crops": {"global_crops_scale": [0.5]}}, "c.yaml: crops.global_crops_scale: expected 2 values"),
        ({"crops": {"local_crops_size": 15}}, "crops.local_crops_size: 15 is not a multiple of student.patch_size"),
        ({"train": {"batch_size": 0}}, "train.batch_size: expected a positive value"),
        ({"dino_head": {"norm_last_layer": "yes"}}, "dino_head.norm_last_layer: expected true or false"),
    ],
)
def test_bad_values_name_the_key(tmp_path, data, message):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        DinoMXConfig.from_yaml(path)
    assert message in str(err.value)


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match="override 'lr=1' must look like section.key=value"):
        DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml", ["lr=1"])
    with pytest.raises(ConfigError, match="train: unknown key 'step'"):
        DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml", ["train.step=1"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        DinoMXConfig.from_yaml(tmp_path / "nope.yaml")


def test_a_pretrained_student_takes_its_sizes_from_its_config_json(tmp_path):
    from dinomx.backbone import Backbone, pretrained_student

    Backbone.from_config(StudentConfig(arch="vit", image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2,
                                       num_attention_heads=3, mlp_ratio=2)).model.save_pretrained(tmp_path / "vit")
    # The YAML's defaults (patch 14, hidden 384) would refuse 32 px crops; they are ignored.
    cfg = DinoMXConfig.from_dict({"student": {"pretrained": str(tmp_path / "vit")},
                                  "crops": {"global_crops_size": 32, "local_crops_size": 16}})
    resolved = pretrained_student(cfg)
    assert (resolved.student.arch, resolved.student.patch_size, resolved.student.hidden_size,
            resolved.student.num_hidden_layers, resolved.student.mlp_ratio) == ("vit", 4, 48, 2, 2)
    assert resolved.flat()["student.hidden_size"] == 48  # what MLflow logs and the signature uses

    misfit = DinoMXConfig.from_dict({"student": {"pretrained": str(tmp_path / "vit")},
                                     "crops": {"global_crops_size": 30, "local_crops_size": 16}})
    with pytest.raises(ConfigError, match=r"crops.global_crops_size: 30 is not a multiple of student.patch_size=4 "
                                          r"\(student.\* read from the config.json of"):
        pretrained_student(misfit)


def test_overrides_take_number_forms_and_an_error_names_the_override():
    cfg = DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml", ["optim.lr=5e-4", "optim.min_lr=.5e-6", "train.epochs=20"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.train.epochs) == (5e-4, 5e-7, 20)
    with pytest.raises(ConfigError, match=r"demo.yaml: override 'optim.lr=fast': expected a number, got 'fast'"):
        DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"demo.yaml: override 'train.epochs=2.5': expected an integer, got 2.5"):
        DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml", ["train.epochs=2.5"])
