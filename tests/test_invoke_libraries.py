"""Task mode on library objects: a transformers pipeline and a diffusers pipeline through rewrite_pipeline,
and the shim's contract: only methods the model has, checked in the driver, typed errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from ray_zerocopy.errors import MethodNotFoundError, ShimAttributeError
from ray_zerocopy.invoke import RemoteModel, rewrite_pipeline
from ray_zerocopy.testing import zoo_input, zoo_model

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] the a ray model share one copy good bad great movie plot".split()
TEXTS = ["the movie good", "bad plot", "ray share one model copy", "great"]


def text_classifier(tmp_path):
    """A transformers text-classification pipeline over a tiny BERT and an offline WordPiece vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, pipeline

    (tmp_path / "vocab.txt").write_text("\n".join(WORDS))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
    model = BertForSequenceClassification(cfg).eval()
    return pipeline("text-classification", model=model, tokenizer=BertTokenizer(str(tmp_path / "vocab.txt")))


def ddpm_pipeline():
    """A diffusers DDPMPipeline around a tiny UNet2DModel."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))


def test_transformers_text_classification_pipeline(ray_local, tmp_path):
    pipe = text_classifier(tmp_path)
    remote = rewrite_pipeline(pipe)
    assert isinstance(remote.model, RemoteModel) and isinstance(pipe.model, torch.nn.Module)
    expected = pipe(TEXTS, top_k=None)
    got = remote(TEXTS, top_k=None)
    assert [[d["label"] for d in row] for row in got] == [[d["label"] for d in row] for row in expected]
    for row, ref in zip(got, expected):
        assert [d["score"] for d in row] == pytest.approx([d["score"] for d in ref], abs=1e-6)
    assert {d["label"] for row in got for d in row} == {"neg", "neu", "pos"}  # labels come from the skeleton's config


def test_diffusers_ddpm_pipeline(ray_local):
    pipe = ddpm_pipeline()
    remote = rewrite_pipeline(pipe)
    assert isinstance(remote.unet, RemoteModel) and isinstance(pipe.unet, torch.nn.Module)
    kwargs = dict(batch_size=2, num_inference_steps=3, output_type="np")
    expected = pipe(generator=torch.Generator().manual_seed(7), **kwargs).images
    got = remote(generator=torch.Generator().manual_seed(7), **kwargs).images
    assert got.shape == expected.shape == (2, 8, 8, 3)
    assert abs(got - expected).max() < 1e-5


def test_shim_serves_plain_attributes_from_the_skeleton(ray_local, tmp_path):
    pipe = ddpm_pipeline()
    shim = rewrite_pipeline(pipe).unet
    assert shim.config.sample_size == 8 and shim.config == pipe.unet.config
    assert shim.dtype == torch.float32 and shim.device == torch.device("cpu")
    assert list(__import__("inspect").signature(shim.forward).parameters)[:2] == ["sample", "timestep"]
    with pytest.raises(ShimAttributeError, match=r"conv_in.*holding weights.*Fix: read it from the model") as info:
        shim.conv_in  # noqa: B018
    assert info.value.attribute == "conv_in"
    exposed = r"method 'num_parameters' is not exposed.*method_names=\(\.\.\., 'num_parameters'\)"
    with pytest.raises(ShimAttributeError, match=exposed):
        shim.num_parameters  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shim.nope  # noqa: B018
    clone = pickle.loads(pickle.dumps(shim))  # the shim travels without its meta skeleton, and rebuilds it
    assert clone.__dict__["_skeleton"] is None and clone.config.sample_size == 8


class Scorer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = zoo_model("hard_cases")

    def forward(self, ids):
        return self.inner(ids)

    def score(self, ids):
        return self.inner(ids).amax(-1)


def test_shim_exposes_only_methods_the_model_has(ray_local):
    """Issue 13: hasattr is False for a method the model lacks, and such a name is refused at rewrite time."""
    model = Scorer().eval()
    shim = rewrite_pipeline(model)
    assert callable(shim) and hasattr(shim, "forward")
    assert not hasattr(shim, "predict") and not hasattr(shim, "score")  # score exists but is not exposed
    with pytest.raises(MethodNotFoundError, match=r"'predict'.*Fix:") as info:
        rewrite_pipeline(model, method_names=("__call__", "predict"))
    assert info.value.method == "predict" and "score" in info.value.available
    assert isinstance(info.value, ValueError)
    exposed = rewrite_pipeline(model, method_names=("score",))
    assert hasattr(exposed, "score") and not hasattr(exposed, "forward")  # forward comes only with __call__
    ids = zoo_input()
    with torch.no_grad():
        assert torch.equal(exposed.score(ids), model.score(ids))
