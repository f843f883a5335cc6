"""Text generation with a base model plus adapter: chat-aware, greedy by default, streaming."""

from __future__ import annotations

import torch


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                  stream: bool = False, raw: bool = False) -> str:
    """Render `prompt` like the training data (chat template when there is one) and continue it."""
    from lorakit.data.formats import generation_prompt_ids

    ids = generation_prompt_ids(tokenizer, prompt, "text" if raw else "chat")
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, streamer=streamer)
    if temperature > 0:
        options["temperature"] = temperature
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), **options)
    model.train(was_training)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()
