"""The inputs YAML: read, check everything up front, return a typed ``Config``.

Upstream BLMM's YAML keys keep their meaning (docs/inputs.md lists every key).  All
problems are collected and raised together as one ``ConfigError`` before any image
data is read: images are checked from their headers only.  The user's YAML is never
written to; ``Config.to_yaml_dict()`` gives the resolved inputs for ``outdir/inputs.yml``.
"""
from blmm.config.load import load_config
from blmm.config.readers import parse_number, parse_vector_text
from blmm.config.schema import DEFAULT_MAXMEM, DEFAULT_MINLOG, KNOWN_KEYS, Config, CorrectionSettings

__all__ = ["DEFAULT_MAXMEM", "DEFAULT_MINLOG", "KNOWN_KEYS", "Config", "CorrectionSettings", "load_config", "parse_number",
           "parse_vector_text"]
