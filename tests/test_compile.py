"""--compile: the flag reaches the loop, and a compiled model trains as the eager one does."""
import argparse

import pytest
import torch

from fasttrain.cli import add_dataclass_args, dataclass_from_args
from fasttrain.model import GPT, ModelConfig
from fasttrain.train import TrainConfig, compile_blocks, use_compile


def _parse(*flags) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig, "training")
    return dataclass_from_args(TrainConfig, parser.parse_args(list(flags)))


def test_compile_flag_defaults_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _parse().compile is None
    assert not use_compile(_parse(), cpu) and use_compile(_parse(), cuda)
    assert use_compile(_parse("--compile"), cpu)
    assert not use_compile(_parse("--no-compile"), cuda)


def _tiny_model(seed=0) -> GPT:
    cfg = ModelConfig(depth=2, n_embd=32, head_dim=8, n_kv_head=2, vocab_size=97, max_seq_len=16)
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # the zero-initialised projections would hide the blocks from the loss
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.1)
            block.mlp.c_proj.weight.normal_(std=0.1)
    return model


@pytest.mark.slow  # compiling takes about 35 s on a 2-core CPU
def test_compiled_model_matches_eager():
    """Loss and every gradient of a compiled tiny model equal eager's up to float rounding, on
    packed documents (the training path: varlen attention, RoPE restarting per document)."""
    eager, compiled = _tiny_model(), compile_blocks(_tiny_model())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 16), generator=gen)
    targets = torch.randint(0, 97, (2, 16), generator=gen)
    targets[0, :3] = -1  # ignored targets, as a masked stage has
    cu_seqlens = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32)  # every row start starts a document
    for _ in range(2):  # a second call runs the compiled code without recompiling
        losses = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model(ids, targets, cu_seqlens, 11)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
