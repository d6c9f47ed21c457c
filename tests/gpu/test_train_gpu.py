"""GPU checks of the training path: logit-KD losses on CUDA, and DeepSpeed ZeRO-2/3 in bf16 over
nccl with distray's DeepSpeed config builder and loss.

    pytest tests/gpu -m gpu          # skipped where no CUDA GPU is present
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["kd", "reverse_kl", "jsd"])
def test_logit_losses_on_cuda_match_cpu(kind: str) -> None:
    from distray.train.losses import logit_loss_per_position

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g)
    teacher = torch.randn(64, 300, generator=g).log_softmax(-1)
    lp, ids = teacher.topk(5, dim=-1)
    cpu = logit_loss_per_position(kind, logits, ids, lp, 2.0)
    gpu = logit_loss_per_position(kind, logits.cuda(), ids.cuda(), lp.cuda(), 2.0)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    bf16 = logit_loss_per_position(kind, logits.cuda().bfloat16().float(), ids.cuda(), lp.cuda(), 2.0)
    assert torch.allclose(bf16.mean().cpu(), cpu.mean(), rtol=0.05)


@pytest.mark.parametrize("kind", ["kd", "reverse_kl", "jsd"])
def test_padded_topk_gives_finite_bf16_gradients_on_cuda(kind: str) -> None:
    # A batch mixing k = 5 and k = 2 rows (the collator pads with MISSING_LOGPROB), bf16 logits as
    # under DeepSpeed bf16: gradients stay finite and match the CPU float32 ones.
    from distray.train.losses import IGNORE_INDEX, MISSING_LOGPROB, compute_loss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 300, generator=g)
    labels = torch.randint(0, 300, (2, 6), generator=g)
    labels[:, 0] = IGNORE_INDEX
    lps, ids = torch.randn(2, 6, 300, generator=g).log_softmax(-1).topk(5, -1)
    lps = lps.clone()
    lps[1, :, 2:] = MISSING_LOGPROB
    ids[1, :, 2:] = 0
    grads = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        x = logits.detach().to(device, dtype).clone().requires_grad_(True)
        out = compute_loss(x, labels.to(device), loss=kind, alpha=0.5, temperature=2.0,
                           topk_ids=ids.to(device), topk_logprobs=lps.to(device))
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad.float()).all(), (kind, device)
        grads[device] = x.grad.float().cpu()
    torch.testing.assert_close(grads["cuda"], grads["cpu"], rtol=0.05, atol=2e-3)


@pytest.fixture(scope="module")
def nccl_world():
    import deepspeed

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
         "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    )
    deepspeed.init_distributed(dist_backend="nccl")
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_bf16_kd_steps_reduce_loss_on_gpu(nccl_world, zero_stage: int) -> None:
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from distray.config import TrainConfig
    from distray.train.losses import compute_loss
    from distray.train.plan import build_deepspeed_config

    tc = TrainConfig(zero_stage=zero_stage, precision="bf16", micro_batch_size=8, lr=3e-3, num_workers=1)
    ds_cfg = build_deepspeed_config(tc, world_size=1, use_gpu=True)
    assert ds_cfg["train_batch_size"] == 8 and ds_cfg["bf16"]["enabled"]
    torch.manual_seed(0)
    vocab = 262
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    ids = torch.randint(5, vocab, (8, 24), device="cuda")
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :8] = -100  # prompt positions carry no loss
    teacher = torch.randn(8, 24, vocab, device="cuda").log_softmax(-1)
    topk_lp, topk_ids = teacher.topk(5, dim=-1)
    losses = []
    for _ in range(25):
        logits = engine(input_ids=ids).logits.float()
        parts = compute_loss(logits, labels, loss="kd", alpha=0.5, temperature=2.0,
                             topk_ids=topk_ids, topk_logprobs=topk_lp)
        engine.backward(parts.loss)
        engine.step()
        losses.append(float(parts.loss))
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    assert losses[-1] < 0.7 * losses[0], losses
