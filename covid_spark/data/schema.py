"""The Petastorm schema of the preprocessed dataset, declared once."""
from __future__ import annotations

import numpy as np
from petastorm.codecs import NdarrayCodec, ScalarCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql.types import IntegerType, StringType

# One row per readable input image. The image is stored raw (NdarrayCodec): decoding it
# when training costs a memcpy, not a PNG/JPEG decode. Its side is fixed per dataset
# (image_size in _summary.json) but not in the schema, so one schema serves every size.
# A grey image (three equal channels, as every grey X-ray decodes) is stored as ONE channel,
# a third of the bytes to write, move and read; readers get three channels back from
# covid_spark.training.tfdata (to_three_channels), so every consumer sees (size, size, 3) uint8.
XraySchema = Unischema("XraySchema", [
    UnischemaField("image", np.uint8, (None, None, None), NdarrayCodec(), False),
    UnischemaField("label", np.int32, (), ScalarCodec(IntegerType()), False),
    UnischemaField("label_name", np.str_, (), ScalarCodec(StringType()), False),
    UnischemaField("patient_id", np.str_, (), ScalarCodec(StringType()), False),
    UnischemaField("source", np.str_, (), ScalarCodec(StringType()), False),
    UnischemaField("path", np.str_, (), ScalarCodec(StringType()), False),
    # The image's 256-bit difference hash (covid_spark.data.duplicates.dhash, 16×16) as 64 hex digits: lets a
    # later stage find near-copies of these images in another dataset without decoding them again.
    UnischemaField("dhash", np.str_, (), ScalarCodec(StringType()), False),
    # PA, AP, LATERAL, ... or "" when unknown (covid_spark.inputs.views): the manifest's view, else DICOM ViewPosition.
    UnischemaField("view", np.str_, (), ScalarCodec(StringType()), False),
    # With preprocess.lung_crop: the lung box and mask summary as JSON (covid_spark.lungs.framing); "" otherwise.
    UnischemaField("lungs", np.str_, (), ScalarCodec(StringType()), False),
    UnischemaField("split", np.str_, (), ScalarCodec(StringType()), False),
])
