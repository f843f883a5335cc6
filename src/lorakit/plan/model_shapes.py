"""The sizes of a Llama-style decoder that decide memory and FLOPs, read without any weights.

A model is named by a preset (`PRESETS`: the Llama-3.2-1B and Llama-3.1-8B shapes of the GPU benchmarks and the built-in SmolLM2), a
config.json (file or model folder), a hub id, a config dict or a transformers config object;
`model_shape` turns any of them into a `ModelShape`. Multimodal configs are read through their
`text_config`. Anything without the Llama-style sizes (GPT-2, encoders) is a ConfigError: the
estimator does not describe it.

The adapted projections of a layer come from a preset (all-linear, attention, mlp, qv) or a
list of names (`resolve_targets`), and the trainable LoRA parameters are r * (in + out) per
adapted projection (`count_lora_params`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.safe_io import read_json
from lorakit.values import is_positive_int

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = {
    "all-linear": PROJECTIONS, "all": PROJECTIONS,
    "attention": PROJECTIONS[:4], "mlp": PROJECTIONS[4:], "qv": ("q_proj", "v_proj"),
}

TargetSpec = Union[str, Sequence[str]]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that decide memory and FLOPs."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    context: int | None = None  # max_position_embeddings, when known

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.projection_shapes().values())

    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return embed + head + norms + self.num_layers * self.layer_linear_params()

    def matmul_params(self) -> int:
        """N_mm: every matmul's parameters, the output head included, the embedding lookup not."""
        return self.num_layers * self.layer_linear_params() + self.vocab_size * self.hidden_size


# The GPU benchmarks' shapes (docs/performance.md) and the built-in model.
PRESETS = {
    "1b": ModelShape("1b (Llama-3.2-1B shape)", 2048, 8192, 16, 32, 8, 64, 128256, True, 131072),
    "8b": ModelShape("8b (Llama-3.1-8B shape)", 4096, 14336, 32, 32, 8, 128, 128256, False, 131072),
    "smollm2-135m": ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 64, 49152, True, 8192),
}
PRESETS["smollm2-135m-instruct"] = PRESETS["smollm2-135m"]


def resolve_targets(targets: TargetSpec) -> tuple[str, ...]:
    """The adapted projections of each layer, from a preset or a list of names (q or q_proj)."""
    if isinstance(targets, str):
        if targets in TARGET_GROUPS:
            return TARGET_GROUPS[targets]
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    chosen = []
    for name in targets:
        if name in TARGET_GROUPS:  # "attention,mlp", as train takes it
            chosen += TARGET_GROUPS[name]
            continue
        full = name if name.endswith("_proj") else f"{name}_proj"
        if full not in PROJECTIONS:
            raise ConfigError(
                f"unknown target {name!r} for the estimator: use a preset ({', '.join(TARGET_GROUPS)}) "
                f"or names among {', '.join(PROJECTIONS)}"
            )
        chosen.append(full)
    if not chosen:
        raise ConfigError("targets is empty: name at least one projection, e.g. all-linear")
    return tuple(p for p in PROJECTIONS if p in chosen)


# ---- model shapes from presets, config files and transformers configs -----------------------

def model_shape(model: Any) -> ModelShape:
    """A ModelShape from a preset name, a config.json (file or folder), a hub id, a dict or an
    HF config object."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        return shape_from_dict(model, "config")
    if isinstance(model, (str, Path)):
        return _shape_from_name(str(model))
    if hasattr(model, "to_dict"):
        return shape_from_dict(model.to_dict(), type(model).__name__)
    raise ConfigError(f"cannot read model sizes from a {type(model).__name__}")


def _shape_from_name(name: str) -> ModelShape:
    if name.lower() in PRESETS:
        return PRESETS[name.lower()]
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        path = _converted_config(path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:  # bad JSON, a number too long, nesting too deep
            raise ModelLoadError(f"cannot read model config {path}: {exc}; restore the model's own "
                                 "config.json") from None
        return shape_from_dict(data, str(path))
    if Path(name).exists():
        raise ModelLoadError(f"{name} holds no config.json; pass a model folder, a config.json or a preset")
    if name.startswith((".", "/", "~")):  # a path, not a hub id
        raise ModelLoadError(f"model {name} does not exist (relative paths are read from the current folder, "
                             f"{Path.cwd()}); pass a model folder, a config.json or a preset")
    return _shape_from_hub(name)


def _converted_config(gguf: Path) -> Path:
    """A .gguf's config.json: the one in the folder lorakit converts it to on its first load (the
    estimate reads configs only, and converting dequantises every weight)."""
    from lorakit.gguf_convert import converted_gguf_dir

    folder = converted_gguf_dir(gguf)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{gguf} is a .gguf, whose config the estimate reads from the copy lorakit converts it "
                             f"to on first use; run `lorakit train --model {gguf} --dry-run` once, or pass the "
                             "original model's folder or config.json")
    return folder / "config.json"


def _shape_from_hub(name: str) -> ModelShape:
    try:
        from transformers import AutoConfig

        from lorakit.models import hub_reachable

        # offline: only the local HF cache, at once (transformers would retry the network for ~25 s)
        config = AutoConfig.from_pretrained(name, **({} if hub_reachable() else {"local_files_only": True}))
    except Exception as exc:  # hub errors come in many types; all mean "not found here"
        presets = ", ".join(p for p in PRESETS if p != "smollm2-135m-instruct")
        raise ModelLoadError(
            f"cannot find a model config for {name!r} ({type(exc).__name__}); pass a preset ({presets}), "
            "a config.json, a model folder, or a hub id (needs network)"
        ) from None
    return shape_from_dict(config.to_dict(), name)


# BERT-style encoders: their configs carry the decoder's size keys too, but not its step
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "distilbert",
                                 "albert", "camembert", "mpnet", "modernbert", "ernie", "longformer", "big_bird",
                                 "xlm", "esm", "nomic_bert", "roformer", "funnel", "luke", "megatron-bert"})


# where configs give the experts of a mixture-of-experts layer (Mixtral, Qwen-MoE, OLMoE, DeepSeek...)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _experts_per_layer(data: dict) -> int | None:
    """The experts per layer a mixture-of-experts config names (above 1), or None for a dense one.
    Some dense configs carry an expert count among their class defaults: they say they are dense
    (Doge's is_moe, enable_moe_block; Nemotron-H's layer types without "moe")."""
    if data.get("is_moe") is False or data.get("enable_moe_block") is False:
        return None
    block_types = data.get("layers_block_type")
    if isinstance(block_types, list) and "moe" not in block_types:
        return None
    counts = []
    for key in EXPERT_COUNT_KEYS:
        value = data.get(key)
        values = value if isinstance(value, list) else [value]  # per modality in some (Ernie-4.5-VL)
        counts += [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 1]
    return max(counts) if counts else None


def shape_from_dict(data: dict, source: str) -> ModelShape:
    """Read a Llama-style config dict (multimodal configs: their text_config)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} holds a JSON {type(data).__name__}, not a model config (a mapping of "
                          "sizes); pass the model's own config.json")
    data = data.get("text_config") or data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: text_config is a {type(data).__name__}, not a mapping of sizes; pass the "
                          "model's own config.json")
    kind = data.get("model_type")
    if kind is not None and not isinstance(kind, str):
        raise ConfigError(f"{source}: model_type is {kind!r}, not a name; pass the model's own config.json")
    if data.get("is_encoder_decoder") or kind in ENCODER_MODEL_TYPES:
        raise ConfigError(
            f"{source} is {'an encoder-decoder' if data.get('is_encoder_decoder') else 'an encoder'} model "
            f"(model_type {kind!r}); the estimator models Llama-style decoders (Llama, Mistral, Qwen, SmolLM, "
            "Gemma-like) only, so it has no figures for it"
        )
    experts = _experts_per_layer(data)
    if experts:
        raise ConfigError(
            f"{source} is a mixture-of-experts model ({experts} experts per layer, model_type {kind!r}); the "
            "estimator models dense Llama-style decoders only, so it has no figures for it (its count would miss "
            "the experts' weights)"
        )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    wrong = [f"{k} is {data[k]!r}, not a positive integer" for k in required
             if k in data and (not isinstance(data[k], int) or isinstance(data[k], bool))]
    if wrong:
        raise ConfigError(f"{source} does not describe a model: {'; '.join(wrong)}; pass the model's own config.json")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(
            f"{source} lacks {', '.join(missing)}: the estimator needs a Llama-style decoder config "
            f"(model_type {data.get('model_type')!r} is not one)"
        )
    heads = data["num_attention_heads"]
    shape = ModelShape(
        name=str(data.get("_name_or_path") or data.get("model_type") or source),
        hidden_size=data["hidden_size"], intermediate_size=data["intermediate_size"],
        num_layers=data["num_hidden_layers"], num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or (data["hidden_size"] // heads if heads > 0 else 0),
        vocab_size=data["vocab_size"], tie_word_embeddings=_ties_embeddings(data),
        context=context_length(data),
    )
    problems = _shape_problems(shape, explicit_head_dim="head_dim" in data and data["head_dim"] is not None)
    if problems:
        raise ConfigError(f"{source} does not describe a model: {'; '.join(problems)}; pass the model's own config.json")
    return shape


def context_length(config: Any) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings, GPT-2's n_positions),
    from a config dict or object."""
    if not isinstance(config, dict) and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()  # a multimodal model's text model
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    limit = get("max_position_embeddings") or get("n_positions") or get("max_seq_len")  # MPT's name
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def _shape_problems(shape: ModelShape, explicit_head_dim: bool) -> list[str]:
    sizes = {"hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
             "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads,
             "num_key_value_heads": shape.num_kv_heads, "head_dim": shape.head_dim, "vocab_size": shape.vocab_size}
    problems = [f"{key} is {value!r}, not a positive integer" for key, value in sizes.items()
                if not is_positive_int(value)]
    if problems:
        return problems
    if not explicit_head_dim and shape.hidden_size % shape.num_heads:
        problems.append(f"hidden_size {shape.hidden_size} is not a multiple of num_attention_heads {shape.num_heads}")
    if shape.num_heads % shape.num_kv_heads:
        problems.append(f"num_attention_heads {shape.num_heads} is not a multiple of num_key_value_heads "
                        f"{shape.num_kv_heads}")
    return problems


def _ties_embeddings(data: dict) -> bool:
    """tie_word_embeddings, or when a config.json leaves it out (transformers writes only values
    that differ from the class's defaults), its model type's default: True for Gemma, False for
    Llama and Qwen2."""
    if "tie_word_embeddings" in data:
        return bool(data["tie_word_embeddings"])
    try:
        from transformers import CONFIG_MAPPING

        return bool(CONFIG_MAPPING[data.get("model_type")]().tie_word_embeddings)
    except Exception:  # an unknown model type or a transformers without it: the common case
        return False


# ---- trainable parameters -------------------------------------------------------------------

def count_lora_params(model_config: Any, r: int, targets: TargetSpec = "all-linear") -> int:
    """Trainable LoRA parameters: r * (in + out) per adapted projection, over all layers."""
    shape = model_shape(model_config)
    per_layer = sum(r * (i + o) for name, (i, o) in shape.projection_shapes().items() if name in resolve_targets(targets))
    return shape.num_layers * per_layer
