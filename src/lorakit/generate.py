"""Text generation with a base model plus adapter: chat-aware, greedy by default, streaming or in batches.

Sampling (a temperature above 0) draws each prompt's tokens from a generator of its own, seeded per
prompt from torch's global one (which `--seed` sets): a prompt's sampled answer is then the same
whether it runs alone, streamed, or in any batch, and every adapter of `--use all` answers it with
the same random draws.
"""

from __future__ import annotations

import torch


def generate_text(model, tokenizer, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                  stream: bool = False, raw: bool = False, system: str | None = None,
                  seed: int | None = None) -> str:
    """Render `prompt` like the training data (chat template when there is one, with `system` as
    its system turn: the template's own default where None) and continue it; `seed`: the sampler's
    (drawn from torch's global generator where None)."""
    ids = prompt_ids(model, tokenizer, prompt, max_new_tokens, raw=raw, system=system)
    return complete_ids(model, tokenizer, ids, max_new_tokens, temperature, stream=stream,
                        seeds=None if seed is None else [seed])


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
                 stream: bool = False, seeds: list[int] | None = None) -> str:
    """The text the model continues `ids` with (greedy at temperature 0), streamed to stdout if asked."""
    if not stream:
        return complete_batch(model, tokenizer, [ids], max_new_tokens, temperature, seeds)[0]
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = torch.tensor([ids], device=next(model.parameters()).device)
    output = _generate(model, tokenizer, inputs, torch.ones_like(inputs), max_new_tokens,
                       _sampler(model, temperature, seeds, 1), streamer)
    return _answer_text(tokenizer, output[0, len(ids):], stop_token_ids(model, tokenizer))


def complete_batch(model, tokenizer, batch: list[list[int]], max_new_tokens: int,
                   temperature: float = 0.0, seeds: list[int] | None = None) -> list[str]:
    """Each prompt's continuation, the prompts answered together by one `generate` call. They are
    padded on the left, so that every row's new tokens start in the same column, and masked:
    transformers then numbers each row's positions from its own first token (position ids from
    the attention mask), and a greedy answer is the one the prompt gets alone."""
    stops = stop_token_ids(model, tokenizer)
    width = max(len(ids) for ids in batch)
    inputs = torch.full((len(batch), width), padding_id(model, tokenizer, stops), dtype=torch.long)
    mask = torch.zeros_like(inputs)
    for row, ids in enumerate(batch):
        inputs[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    device = next(model.parameters()).device
    output = _generate(model, tokenizer, inputs.to(device), mask.to(device), max_new_tokens,
                       _sampler(model, temperature, seeds, len(batch)))
    return [_answer_text(tokenizer, row[width:], stops) for row in output]


def complete_in_order(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                      batch_size: int = 8, window: int | None = None, seeds: list[int] | None = None):
    """Every prompt's answer, in the prompts' order, answered `batch_size` at a time in batches of
    like lengths (see `length_sorted_batches`). After each batch: (how many it answered, the
    answers now ready in order); the second is empty while an earlier prompt waits for a later batch.
    `seeds`: one per prompt for sampling (drawn from torch's global generator where None)."""
    batch_size = batch_size if pads_safely(model) else 1
    if temperature > 0 and seeds is None:
        seeds = sampling_seeds(len(prompts))
    answered, ready = {}, 0
    for batch in length_sorted_batches([len(ids) for ids in prompts], batch_size, window):
        answered.update(zip(batch, complete_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens,
                                                  temperature, seeds and [seeds[i] for i in batch])))
        texts = []
        while ready in answered:
            texts.append(answered.pop(ready))
            ready += 1
        yield len(batch), texts


def length_sorted_batches(lengths: list[int], batch_size: int, window: int | None = None) -> list[list[int]]:
    """The indices of `lengths` in batches: each `window` of consecutive ones (default: all) sorted
    longest first, so that a batch pads its rows little and the largest batch, the one most likely
    to run out of memory, runs first. A smaller window returns the first answers sooner."""
    window = window or max(len(lengths), 1)
    batches = []
    for start in range(0, len(lengths), window):
        indices = sorted(range(start, min(start + window, len(lengths))), key=lambda i: -lengths[i])
        batches += [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return batches


def pads_safely(model) -> bool:
    """Whether a left-padded row is answered as it is alone: transformers numbers a padded row's
    positions from its attention mask for a model whose forward takes position ids; one that
    numbers them itself would start a row's positions at its padding."""
    import inspect

    return "position_ids" in inspect.signature(model.forward).parameters


def padding_id(model, tokenizer, stops: list[int] | None) -> int:
    """The id that fills the left padding and a finished row's tail: the tokenizer's pad token,
    else its first stop token (EOS), else 0, the first the model has an embedding row for. Either
    is masked or cut away; the tokenizer itself is left as the caller has it."""
    from lorakit.model_limits import token_rows

    rows = token_rows(model)
    candidates = [tokenizer.pad_token_id, *(stops or []), 0]
    return next(int(i) for i in candidates if i is not None and (rows is None or int(i) < rows))


def sampling_seeds(count: int) -> list[int]:
    """`count` sampler seeds from torch's global generator: after `torch.manual_seed(s)`, the same
    list for the same s."""
    return torch.randint(0, 2**62, (count,)).tolist()


class RowSampler:
    """A logits processor that samples each row's next token with the row's own generator, after
    the warpers transformers' sampling would apply (`sampling_warpers`). It returns scores that
    leave only the sampled token finite, so that greedy decoding, which draws nothing from torch's
    generator, emits it: transformers' own sampling draws a batch's tokens from one generator, so a
    row's tokens would depend on the rows beside it."""

    def __init__(self, warpers: list, seeds: list[int]):
        self.warpers, self.seeds, self.generators = warpers, seeds, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        if self.generators is None:  # on the device the logits are on, known at the first token
            self.generators = [torch.Generator(scores.device).manual_seed(seed) for seed in self.seeds]
        probabilities = torch.softmax(scores.float(), dim=-1)
        chosen = torch.cat([torch.multinomial(row, 1, generator=generator)
                            for row, generator in zip(probabilities, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)


# transformers' own default where a model's generation config sets no top-k
DEFAULT_TOP_K = 50


def sampling_warpers(model, temperature: float) -> list:
    """The warpers transformers' sampling applies at `temperature` under the model's generation
    config, in its order: temperature, top-h, top-k, top-p, min-p, typical-p, epsilon, eta."""
    import transformers

    config = getattr(model, "generation_config", None)

    def setting(name: str):
        return getattr(config, name, None)

    def below_one(name: str) -> bool:
        return setting(name) is not None and setting(name) < 1.0

    def cutoff(name: str) -> bool:
        return below_one(name) and setting(name) > 0.0

    top_k = DEFAULT_TOP_K if setting("top_k") is None else setting("top_k")
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    warpers += [transformers.TopHLogitsWarper(setting("top_h"))] if setting("top_h") is not None else []
    warpers += [transformers.TopKLogitsWarper(top_k)] if top_k > 0 else []
    warpers += [transformers.TopPLogitsWarper(setting("top_p"))] if below_one("top_p") else []
    warpers += [transformers.MinPLogitsWarper(setting("min_p"))] if setting("min_p") is not None else []
    warpers += [transformers.TypicalLogitsWarper(setting("typical_p"))] if below_one("typical_p") else []
    warpers += [transformers.EpsilonLogitsWarper(setting("epsilon_cutoff"))] if cutoff("epsilon_cutoff") else []
    if cutoff("eta_cutoff"):
        warpers.append(transformers.EtaLogitsWarper(setting("eta_cutoff"), device=model.device))
    return warpers


def _sampler(model, temperature: float, seeds: list[int] | None, rows: int) -> RowSampler | None:
    """The sampler for `rows` prompts at `temperature` (None: greedy), with their seeds (drawn where None)."""
    if temperature <= 0:
        return None
    return RowSampler(sampling_warpers(model, temperature), sampling_seeds(rows) if seeds is None else seeds)


def _generate(model, tokenizer, inputs, mask, max_new_tokens: int, sampler: RowSampler | None, streamer=None):
    from transformers import LogitsProcessorList

    stops = stop_token_ids(model, tokenizer)
    # greedy either way: a sampler leaves greedy decoding one token per row
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                   pad_token_id=padding_id(model, tokenizer, stops), streamer=streamer)
    if sampler is not None:
        options["logits_processor"] = LogitsProcessorList([sampler])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.generate(inputs, attention_mask=mask, **options)
    finally:
        model.train(was_training)


def _answer_text(tokenizer, new_ids, stops: list[int] | None) -> str:
    """A row's new tokens up to its own first stop token (a batch's finished rows go on with
    padding, and a stop token need not be a special token the decoding would skip)."""
    ids = new_ids.tolist()
    end = next((i for i, token in enumerate(ids) if token in (stops or ())), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


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
