"""What a run prints: the plan (with where each choice came from), a dry run, the final report."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from lorakit.config import effective_scale
from lorakit.lora import lora_layers, lora_report
from lorakit.terminal import Console

console = Console()


def print_plan(prepared) -> None:
    config, lora = prepared.config, prepared.config.lora
    scale = effective_scale(config)
    table = Table(title="LoRA choices", show_header=True, header_style="bold")
    table.add_column("parameter")
    table.add_column("value")
    table.add_column("from")
    src = config.sources
    table.add_row("r", str(lora.r), src.get("lora.r", "default"))
    table.add_row("alpha", f"{lora.alpha:g}", src.get("lora.alpha", "default"))
    table.add_row("scale", f"{scale:.4g} ({'alpha/sqrt(r), rsLoRA' if lora.rslora else 'alpha/r'})",
                  src.get("lora.rslora", "default"))
    table.add_row("targets", _targets_text(prepared), src.get("lora.targets", "default"))
    console.print(table)
    report = lora_report(prepared.model)
    s = prepared.settings
    console.print(f"model: {prepared.source.name}   data: {prepared.train.stats.examples} training examples "
                  f"({prepared.train.format}), {len(prepared.eval) if prepared.eval else 0} eval")
    console.print(f"{report}   steps: {s.total_steps} x {s.grad_accum} micro-batch(es) of {s.batch_size} "
                  f"x {s.seq_len} tokens   device: {s.device.type}")
    for notice in prepared.notices:
        console.print(f"[dim]{notice}[/dim]")
    for warning in data_warnings(prepared):
        console.print(f"[yellow]warning:[/yellow] {warning}")


def data_warnings(prepared) -> list[str]:
    """What reading the data found (records skipped or cut, no EOS): the training files', and an
    --eval-data file's (a split's eval part was counted with the training data)."""
    warnings = list(prepared.train.stats.warnings)
    if prepared.eval is not None and prepared.config.data.eval_data:
        warnings += [f"eval data: {w}" for w in prepared.eval.stats.warnings]
    return warnings


def _targets_text(prepared) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(prepared.model)})
    lora = prepared.config.lora
    return f"{lora.targets}{f' except {lora.exclude}' if lora.exclude else ''} -> {', '.join(leaves)}"


def print_dry_run(prepared) -> None:
    from lorakit.data.formats import render_marked

    stats = prepared.train.stats
    console.print("\n[bold]one training example[/bold] (trained tokens inside [[ ]]):")
    console.print(render_marked(prepared.train.dataset[0], prepared.tokenizer), markup=False, highlight=False)
    console.print(f"\n[bold]data[/bold]: {stats.format_note}")
    split = f", {stats.split} long texts split" if stats.split else ""
    console.print(f"  examples {stats.examples} (dropped {stats.dropped}, truncated {stats.truncated}{split}), "
                  f"tokens {stats.total_tokens:,}, trained tokens {stats.label_tokens:,} "
                  f"({100 * (1 - stats.masked_fraction):.1f}%), length min/mean/max "
                  f"{stats.length_min}/{stats.length_mean:.0f}/{stats.length_max}")
    if prepared.train.system_turn:
        console.print("  every record opens with the same system turn: the adapter keeps it, and generate answers "
                      "under it by default", markup=False, highlight=False)
    modules = [name for name, _ in lora_layers(prepared.model)]
    console.print(f"\n[bold]adapted modules[/bold] ({len(modules)}): {', '.join(modules[:8])}"
                  f"{' ...' if len(modules) > 8 else ''}")
    console.print(str(lora_report(prepared.model)))
    console.print("dry run: nothing was trained or written")


def _peak_kind(prepared) -> str:
    """What summary.json's peak_memory_bytes counts (the plan's estimate counts the step's tensors)."""
    if prepared.settings.device.type == "cuda":
        return "tensors allocated on the GPU"
    return "the process's resident memory: the step's tensors plus Python, torch and the data"


def _pauses(summary: dict) -> str:
    """The part of the training time the tokens/s leaves out, when it is worth a word."""
    paused = summary.get("eval_and_checkpoint_seconds", 0.0)
    return f" ({paused:.0f} s of it mid-run evals and checkpoints)" if paused >= 1 else ""


def print_report(prepared, result, sample_before=None, sample_after=None) -> None:
    s = result.summary
    console.print("\n[bold green]training finished[/bold green]")
    if s.get("base_eval_loss") is not None:
        drop = 100 * (1 - s["final_eval_loss"] / s["base_eval_loss"])
        console.print(f"eval loss: base {s['base_eval_loss']:.4f} -> final {s['final_eval_loss']:.4f} "
                      f"({drop:.1f}% lower); perplexity {s['base_eval_perplexity']:.2f} -> {s['final_eval_perplexity']:.2f}")
    console.print(f"steps {s['steps']}, {s['seen_tokens']:,} tokens ({s['train_tokens']:,} with a label), "
                  f"{s['tokens_per_second']:,.0f} tokens/s, "
                  f"training time {s['wall_seconds']:.0f} s{_pauses(s)}, "
                  f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB "
                  f"({_peak_kind(prepared)})")
    curves = result.output / "loss.png"  # not there when it could not be written (a warning said so)
    console.print(f"adapter: {s['adapter']}   summary: {result.output / 'summary.json'}"
                  + (f"   curves: {curves}" if curves.is_file() else ""))
    if sample_before and sample_after:
        console.print(f"\n[bold]prompt[/bold]: {sample_before[0]}")
        for label, sample in (("before", sample_before), ("after ", sample_after)):
            console.print(Text.assemble((f"{label}: ", "bold"), sample[1]), highlight=False)
