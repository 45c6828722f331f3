"""Training throughput, fp32 against bf16 autocast, measured in one run on this machine.

python -m vgg_onnx.train.throughput --config A --width-mult 0.25 --crop 224 --batch-size 32 --steps 8

Times full SGD steps (forward, loss, backward, update; channels_last, as `train` runs them) on
random batches, so the figure is the network's and not the data pipeline's. The precisions
alternate in rounds, so a machine whose load changes during the run affects both alike.
Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import time

import click
import torch
import torch.nn.functional as F

from .model import VGG, init_weights


def step_time(model, optimizer, images, labels, bf16: bool, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", default="A", show_default=True)
@click.option("--width-mult", default=0.25, show_default=True)
@click.option("--crop", default=224, show_default=True)
@click.option("--classes", default=10, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=8, show_default=True, help="Timed steps per precision and round.")
@click.option("--rounds", default=2, show_default=True)
def main(config, width_mult, crop, classes, batch_size, steps, rounds):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = init_weights(VGG(config, classes, width_mult, crop), "glorot").to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    images = (torch.randn(batch_size, 3, crop, crop, device=device) * 60).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch_size,), device=device)
    times = {"fp32": [], "bf16": []}
    for precision in times:  # warm-up: kernels chosen, memory allocated
        step_time(model, optimizer, images, labels, precision == "bf16", 2)
    for _ in range(rounds):
        for precision in times:
            times[precision].append(step_time(model, optimizer, images, labels, precision == "bf16", steps))
    result = {"config": config, "width_mult": width_mult, "crop": crop, "batch_size": batch_size,
              "device": str(device), "threads": torch.get_num_threads(), "steps": steps * rounds}
    for precision, values in times.items():
        result[f"{precision}_img_per_s"] = round(batch_size / (sum(values) / len(values)), 2)
    result["bf16_speedup"] = round(result["bf16_img_per_s"] / result["fp32_img_per_s"], 3)
    click.echo(f"VGG-{config} width {width_mult}, crop {crop}, batch {batch_size}, {device}, "
               f"{result['threads']} threads, {steps * rounds} timed steps each")
    click.echo(f"  fp32  {result['fp32_img_per_s']:9.2f} img/s")
    click.echo(f"  bf16  {result['bf16_img_per_s']:9.2f} img/s   ({result['bf16_speedup']:.2f}x fp32)")
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
