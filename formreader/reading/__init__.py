"""The reading path, one module per stage: ingest -> register -> locate -> segment -> classify ->
fields (strings and string_model for numbers written freely); template describes a form."""
