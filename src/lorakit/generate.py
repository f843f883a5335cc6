"""Text generation with a base model plus adapter: chat-aware, greedy by default, streaming."""

from __future__ import annotations

import torch


def generate_text(model, tokenizer, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                  stream: bool = False, raw: bool = False, system: str | None = None) -> str:
    """Render `prompt` like the training data (chat template when there is one, with `system` as
    its system turn: the template's own default where None) and continue it."""
    ids = prompt_ids(model, tokenizer, prompt, max_new_tokens, raw=raw, system=system)
    return complete_ids(model, tokenizer, ids, max_new_tokens, temperature, stream=stream)


def prompt_ids(model, tokenizer, prompt: str | list[dict], max_new_tokens: int, raw: bool = False,
               system: str | None = None) -> list[int]:
    """The token ids `generate_text` continues (a user message, or a chat's turns up to the reply),
    checked against the model's vocabulary and context: a batch checks all of them before any runs."""
    from lorakit.data.formats import generation_prompt_ids
    from lorakit.model_limits import check_token_ids, token_rows

    ids = generation_prompt_ids(tokenizer, prompt, "text" if raw else "chat", system=system)
    check_token_ids(token_rows(model), tokenizer, max(ids, default=-1), "the prompt holds")
    _check_context(model, len(ids), max_new_tokens)
    return ids


def complete_ids(model, tokenizer, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 stream: bool = False) -> str:
    """The text the model continues `ids` with (greedy at temperature 0), streamed to stdout if asked."""
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=stop_token_ids(model, tokenizer), streamer=streamer)
    if temperature > 0:
        options["temperature"] = temperature
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), **options)
    model.train(was_training)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()


def stop_token_ids(model, tokenizer) -> list[int] | None:
    """The tokenizer's EOS and every end token of the model's generation config: chat models end
    a turn with a token listed only there (Llama 3's <|eot_id|>, Gemma's <end_of_turn>). None
    when there is none (generate then runs to max_new_tokens)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *([] if configured is None else torch.as_tensor(configured).flatten().tolist())]
    found = list(dict.fromkeys(int(i) for i in ids if i is not None))
    return found or None


# a model whose rotary positions are computed for any length; one without has a table of positions
# (learned: GPT-2, OPT; GPT-J and CodeGen precompute their sin/cos, keyed by rotary_dim) that a
# longer sequence indexes past its end
ROTARY_CONFIG_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_pct", "rotary_emb_base")


def _check_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    from lorakit.errors import ConfigError

    config = getattr(model, "config", None)
    if any(getattr(config, key, None) is not None for key in ROTARY_CONFIG_KEYS):
        return  # rotary positions run past the configured length (with scaling, well past it)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(context, int) and prompt_tokens + max_new_tokens > context:
        room = context - prompt_tokens
        fix = f"lower --max-new-tokens to {room} or less" if room > 0 else "shorten the prompt"
        raise ConfigError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceed the "
                          f"model's context of {context} positions; {fix}")
