"""What a loaded model's own tables and config let its input be: which token ids have a row, how
many positions its position table holds and where its numbering starts, the shortest span some
layer attends over, and whether its ALiBi biases follow the attention mask. The trainer checks
data and packing against these before the first step (train/run.py); generate and recommend
check token ids."""

from __future__ import annotations

from lorakit.errors import ModelLoadError
from lorakit.plan.model_shapes import context_length
from lorakit.values import is_positive_int


def check_token_ids(rows: int | None, tokenizer, largest_id: int, what: str = "the data holds") -> None:
    """ModelLoadError where a token id has no row (of the model's `token_rows`): a tokenizer that is
    not the model's, or one with tokens added after the model was saved. Checked on the ids
    themselves, not on len(tokenizer): a tokenizer may hold more tokens than the model has rows for
    as long as the data never uses them."""
    if rows is None or largest_id < rows:
        return
    token = tokenizer.convert_ids_to_tokens(largest_id)
    raise ModelLoadError(
        f"{what} token id {largest_id} ({token!r}), but the model has rows for ids below {rows} only: its "
        f"tokenizer ({len(tokenizer)} tokens) does not match the model; use the tokenizer saved with the model, "
        "or resize the model's embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) "
        "and save both")


def token_rows(model) -> int | None:
    """How many token ids both the input embeddings and the output layer have a row for."""
    counts = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, get)() if hasattr(model, get) else None
        except NotImplementedError:  # a model class that does not say where its embeddings are
            module = None
        weight = getattr(module, "weight", None)
        if getattr(module, "num_embeddings", None) is not None:
            counts.append(module.num_embeddings)
        elif getattr(module, "out_features", None) is not None:
            counts.append(module.out_features)
        elif weight is not None and weight.dim() == 2:
            counts.append(weight.shape[0])
    return min(counts) if counts else None


def position_table_length(model) -> int | None:
    """How many positions a model that looks them up in a fixed table can take (None: no table).
    GPT-2's wpe; OPT's, whose first 2 rows are an offset; RoBERTa's, whose positions start after
    its padding index; GPT-J's and CodeGen's sin/cos, a buffer; MPT's ALiBi, built max_seq_len wide."""
    limit = context_length(model.config)
    if limit is None:
        return None
    if getattr(model.config, "model_type", None) == "mpt":  # its ALiBi tensor is built max_seq_len wide
        return limit
    table = _position_embedding(model, limit)
    if table is not None:
        return table.num_embeddings - getattr(table, "offset", 0) - first_position_id(model)
    for name, buffer in model.named_buffers():
        if name.endswith("embed_positions") and buffer.dim() == 2 and buffer.shape[0] == limit:
            return limit
    return None


def first_position_id(model) -> int:
    """The position id of an example's first token: 0, except where a position table keeps its
    rows up to the padding index for padding (RoBERTa and the models built on it number positions
    from padding_idx + 1, and take position_ids as they are; OPT adds its offset itself)."""
    table = _position_embedding(model, context_length(model.config))
    return table.padding_idx + 1 if table is not None and table.padding_idx is not None else 0


def _position_embedding(model, limit: int | None):
    """The nn.Embedding a model looks its positions up in (about as many rows as its context), or None."""
    from torch import nn

    if limit is None:
        return None
    tokens = model.get_input_embeddings()
    return next((module for module in model.modules() if isinstance(module, nn.Embedding) and module is not tokens
                 and limit <= module.num_embeddings <= limit + 2), None)


def rope_scaled(model_config) -> bool:
    """Rotary positions rescaled (YaRN, linear, dynamic, llama3): a longer context is what it is for,
    and some configs keep the original max_position_embeddings."""
    parameters = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None)
    return isinstance(parameters, dict) and parameters.get("rope_type", parameters.get("type", "default")) != "default"


def local_attention(model_config) -> tuple[int, str] | None:
    """(span, what) of the shortest attention span some layer keeps: a sliding window (Mistral,
    Gemma 2/3, Phi-3, Starcoder2; Qwen2's is off unless use_sliding_window) or an attention chunk
    (Llama 4); None where every layer sees the whole row. Multimodal models: their text model's."""
    config = _text_config(model_config)
    layer_types = getattr(config, "layer_types", None)
    layer_types = layer_types if isinstance(layer_types, (list, tuple)) else None
    spans = []
    window = getattr(config, "sliding_window", None)
    every_layer_full = layer_types is not None and all(kind == "full_attention" for kind in layer_types)
    if is_positive_int(window) and getattr(config, "use_sliding_window", True) is not False and not every_layer_full:
        spans.append((window, "sliding window"))  # where unsure, the window counts: padded rows are always exact
    chunk = getattr(config, "attention_chunk_size", None)
    if is_positive_int(chunk) and (layer_types is None or "chunked_attention" in layer_types):
        spans.append((chunk, "attention chunk"))
    return min(spans) if spans else None


def uses_alibi(model_config) -> bool:
    """ALiBi biases built from the attention mask (BLOOM, Falcon's alibi option), which a packed
    row's 4D mask breaks. MPT's depend on the key's position alone, which packing leaves exact."""
    config = _text_config(model_config)
    return getattr(config, "model_type", None) == "bloom" or getattr(config, "alibi", False) is True


def _text_config(model_config):
    get = getattr(model_config, "get_text_config", None)
    return get() if callable(get) else model_config
