"""One reader per kind of input, each turning a raw folder into the units ``data.staging`` builds a
dataset from: whole-slide images (``slides``, with ``dicom_slides`` for DICOM whole-slide
series), CT series (``ct_series``) and plain image folders (``image_folders``)."""
