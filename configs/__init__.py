"""Configuration: the typed-dataclass machinery every layer uses, and the recipes (YAML values) beside it.

``vitvq.configs.schema`` turns YAML recipes and dotted ``key=value`` overrides into validated dataclasses;
``models``, ``data``, ``trainer`` and ``launch`` all import it from here, so none reaches into another
layer for it. ``vitvq.configs.cli`` derives a launcher's command line from a config dataclass, and
``vitvq.configs.pool`` declares the resources of a bulk job's pool once. The recipes themselves
(``configs/stage1/*.yaml``) hold values only: no class paths, no code.
"""

from vitvq.configs.schema import ConfigError, ConfigFileError, check, field_docs, flatten, from_dict, load, to_dict, unflatten

__all__ = ["ConfigError", "ConfigFileError", "check", "field_docs", "flatten", "from_dict", "load", "to_dict", "unflatten"]
