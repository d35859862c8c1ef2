"""A DeepSpeed training script in the style of DeepSpeedExamples' CIFAR and DeepSpeed-Chat's SFT step,
written against DeepSpeed's API; only the two import lines differ from a DeepSpeed script:

    import deepspeed                                   ->  import zerostep as deepspeed
    from deepspeed.accelerator import get_accelerator  ->  from zerostep.accelerator import get_accelerator

tests/test_deepspeed_scripts.py runs it on 1 and 2 ranks and checks what it prints.
"""

import argparse
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import zerostep as deepspeed
from zerostep.accelerator import get_accelerator


@dataclass
class CausalLMOutput:  # what a Hugging Face causal LM returns
    loss: torch.Tensor
    logits: torch.Tensor


class TinyCausalLM(nn.Module):
    def __init__(self, vocab=32, dim=16):
        super().__init__()
        self.config = {"vocab_size": vocab, "hidden_size": dim}
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()) for _ in range(2)
        )
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 32, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config-optimizer", action="store_true")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = TinyCausalLM()
    no_decay = ["bias", "LayerNorm.weight", "0.weight"]
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
            "weight_decay": 0.01,
        },
        {
            "params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
            "weight_decay": 0.0,
        },
    ]
    if args.config_optimizer:  # DeepSpeedExamples' CIFAR style: optimizer and scheduler from the config
        engine, optimizer, loader, lr_scheduler = deepspeed.initialize(
            args=args, model=model, model_parameters=groups, training_data=Tokens()
        )
    else:  # DeepSpeed-Chat style: the script's own optimizer over param groups and its own scheduler
        optimizer = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        engine, optimizer, loader, lr_scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, training_data=Tokens()
        )
    device = get_accelerator().device_name(engine.local_rank)
    rank = deepspeed.comm.get_rank()
    losses = []
    for epoch in range(args.epochs):
        engine.train()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = engine(**batch)
            engine.backward(outputs.loss)
            engine.step()
            losses.append(outputs.loss.item())
        engine.tput_timer.update_epoch_count()
        engine.save_checkpoint(args.out, client_state={"epoch": epoch})
    engine.eval()
    with torch.no_grad():
        ids = Tokens().ids[:8].to(device)
        eval_loss = engine(input_ids=ids, labels=ids).loss.item()
    _, client_state = engine.load_checkpoint(args.out)
    # DeepSpeed-Chat's save: stage 3 holds placeholders, gathered for the state dict
    with deepspeed.zero.GatheredParameters(
        list(engine.module.parameters()), enabled=engine.zero_optimization_stage() == 3
    ):
        state_dict = {k: v.clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        print(
            json.dumps(
                {
                    "world_size": deepspeed.comm.get_world_size(),
                    "global_steps": engine.global_steps,
                    "global_samples": engine.global_samples,
                    "first_loss": losses[0],
                    "last_loss": losses[-1],
                    "eval_loss": eval_loss,
                    "lr": engine.get_lr(),
                    "client_state": client_state,
                    "head_norm": state_dict["lm_head.weight"].norm().item(),
                    "epochs": engine.tput_timer.epoch_count,
                }
            )
        )


if __name__ == "__main__":
    main()
