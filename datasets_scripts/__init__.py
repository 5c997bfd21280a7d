"""Dataset converters for SkinCLIP-VL: official download layouts → `datasets.DatasetDict`.

Every converter writes the same schema (see README.md in this folder): `image_id`, `image`, `label`
(`ClassLabel`, fixed order), `metadata_text`, `report`, `group_id` and the raw allowed metadata.
"""
