"""Inputs: where the images come from and how one file becomes an image. Pure Python, no Spark.

- ``sources``: input discovery (manifest CSVs, folders with ``manifest.csv``, folders per class), class
  names, sources and patient keys, the file-name rules.
- ``views``: radiographic views (PA, AP, LATERAL) and the ``--views`` filter.
- ``images``: decoding, image bytes → a fixed-size RGB array (content sniffing, the decompression-bomb check).
- ``dicom``: DICOM recognised by content, header checks, pixel maths to 8-bit grey, PatientID pseudonyms.
- ``rejects``: what a decoder says of a file it will not use (rejected or excluded).
"""
