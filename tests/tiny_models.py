"""Tiny random models built from configs: no download, milliseconds per step."""

import torch


def tiny_llama(seed: int = 0, layers: int = 2, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    options = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    config = LlamaConfig(**{**options, **overrides})
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=256, max_position_embeddings=128, num_labels=3)
    return BertForSequenceClassification(config).eval()


def prefill_then_decode(model, input_ids, prefill: int):
    """Logits of the tokens after `prefill`, decoded from the KV cache of the first `prefill`."""
    import inspect

    # transformers 5.24 names the argument `cache`, 5.17 `past_key_values`
    cache_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.no_grad():
        first = model(input_ids=input_ids[:, :prefill], use_cache=True)
        return model(input_ids=input_ids[:, prefill:], **{cache_name: first.past_key_values}).logits


def randomize_lora(model, seed: int = 1, std: float = 0.05):
    """Give every adapter a non-zero B (and magnitude noise), so parity tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))
    return model


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["define the word apple: a round fruit", "define the word river: a large natural stream of water",
          "the user asks what a word means and the assistant answers with a short definition"]


def tiny_tokenizer():
    """A byte-level BPE with ChatML, trained offline in milliseconds (eos = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", chat_template=CHATML)


def save_tiny_chat_model(path, seed: int = 0, layers: int = 2):
    """A tiny Llama + ChatML tokenizer folder that `lorakit train --model PATH` loads."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=seed, layers=layers, vocab_size=len(tokenizer),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_define_data(path, count: int = 48, seed: int = 0):
    """Instruction-format JSONL with a learnable pattern."""
    import json
    import random

    words = ["apple", "river", "stone", "cloud", "bread", "chair", "light", "music", "ocean", "paper", "tiger", "water"]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            word = rng.choice(words)
            handle.write(json.dumps({"instruction": f"Define the word {word}.", "output": f"{word}: a short definition"}) + "\n")
    return path


def edit_checkpoint_state(folder, change) -> None:
    """Hand-edit a checkpoint's trainer_state.json (`change` edits the dict in place, or returns
    what replaces it) and make its manifest match, as a user or an older lorakit could have."""
    import hashlib
    import json

    from lorakit.train import checkpoint as ckpt

    state = json.loads((folder / ckpt.TRAINER_STATE).read_text())
    replaced = change(state)
    (folder / ckpt.TRAINER_STATE).write_text(json.dumps(state if replaced is None else replaced))
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
