"""Reading and writing config.yaml: the YAML rules a lorakit config follows.

A config holds plain values only (no Python tags), a key given twice is an error rather than the
last one winning, and 1e-4 is a number as YAML 1.2 and Python read it. Where each key belongs
(sections, flat keys, spellings) is config.py's business; this module reads and writes the text.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lorakit.errors import ConfigError


def read_mapping(path: Path) -> dict:
    """The mapping a config file holds, read strictly (`_StrictSafeLoader`); one ConfigError for any
    file that is missing, a folder, not UTF-8, not YAML, or not a mapping."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file (a run's own is OUTPUT/config.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file written by lorakit or by hand")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictSafeLoader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.constructor.ConstructorError as exc:
        problem = _yaml_problem(exc)
        fix = "keep one of them" if "given twice" in problem else \
            "use a plain option name" if "not a plain name" in problem else \
            "remove the tag: a config holds plain values (numbers, strings, lists, mappings) only"
        raise ConfigError(f"config file {path} is not valid YAML for lorakit: {problem}; {fix}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}; fix the syntax") from None
    except RecursionError:  # yaml's reader recurses once per nesting level
        raise ConfigError(f"config file {path} nests too deeply to read; a config is sections of plain options "
                          "(e.g. `lora: {r: 16}`)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options (e.g. `lora: {{r: 16}}`), "
                          f"not {type(raw).__name__}")
    return raw


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.safe_load (no Python object tags), and a key given twice is an error, not last-wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key is a {type(key).__name__}, not a plain name", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _QuotingDumper(yaml.SafeDumper):
    """yaml.safe_dump that quotes the strings _StrictSafeLoader would read as floats (an --output
    named 1e3), so that a saved config.yaml repeats the run."""


# YAML 1.1 (PyYAML) reads 1e-4 and 1.0e4 as text: its floats need a dot and a signed exponent.
# Read them as YAML 1.2 and Python do (a quoted "1e-4" stays text, and is refused for a number).
for _yaml_class in (_StrictSafeLoader, _QuotingDumper):
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what is wrong and where (the YAML error text is several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1})" if mark is not None else problem


def dump(values: dict) -> str:
    """`values` as YAML that `read_mapping` reads back as the same values."""
    return yaml.dump(values, Dumper=_QuotingDumper, sort_keys=False)
