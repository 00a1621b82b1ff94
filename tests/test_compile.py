"""``train.compile``: torch.compile of each transformer layer, in place. The compiled layers give
the eager model's outputs and gradients, keep its parameter names (so checkpoints load into a
plain model), and trace as one graph per layer with no graph break (Inductor on CPU here)."""

from __future__ import annotations

import pytest
import torch

from test_vlm_model import CFG, make_batch
from vidray.models.allinone import ALLINONE_FLAVOURS, AllInOne
from vidray.models.vlm import build_vlm
from vidray.train.parallel import compile_layers, transformer_layers


def vlm_loss(model) -> torch.Tensor:
    batch = make_batch()
    hidden = model(batch["video"], batch["video_mask"], batch["text_ids"], batch["text_mask"], "full")
    return model.lm_logits(hidden).logsumexp(-1).mean()


def allinone_loss(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(2, 3, 3, 32, 32, generator=generator)
    text_ids = torch.randint(5, 100, (2, 7), generator=generator)
    text_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    return model(frames, text_ids, text_mask).square().mean()


def vlm() -> torch.nn.Module:
    return build_vlm(CFG)


def allinone() -> torch.nn.Module:
    return AllInOne(ALLINONE_FLAVOURS["tiny"], vocab_size=100, image_size=32, num_frames=3, max_text_tokens=12)


@pytest.mark.parametrize("build,loss_of", [(vlm, vlm_loss), (allinone, allinone_loss)], ids=["vlm", "allinone"])
def test_compiled_layers_give_the_eager_loss_and_gradients_under_the_same_names(build, loss_of):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = build().eval()  # eval: no dropout, so both sides compute the same function
    compiled = build().eval()
    compiled.load_state_dict(eager.state_dict())
    names = list(compiled.state_dict())

    torch._dynamo.reset()
    counters.clear()
    assert compile_layers(compiled) == len(transformer_layers(eager)) >= 2
    assert list(compiled.state_dict()) == names  # checkpoints keep their keys
    eager_loss, compiled_loss = loss_of(eager), loss_of(compiled)
    eager_loss.backward()
    compiled_loss.backward()

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert counters["stats"]["calls_captured"] > 0  # the layers really went through Dynamo
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_every_network_names_its_transformer_layers_as_its_shard_units():
    """The units FSDP and compile take come from the networks (`shard_units()`), not from a list of
    layer classes in the loop: for every model they are its BERT layers and pre-LN blocks, all of
    them and in module order, wrapped in the task modules as training builds them."""
    from transformers.models.bert.modeling_bert import BertLayer

    from vidray.config.frames import FramesModelConfig, VQModelConfig
    from vidray.models.allinone import Block
    from vidray.models.build import build_net
    from vidray.models.vq import VQ_FLAVOURS, VQTokenizer
    from vidray.objectives.allinone import PretrainModel

    def frames(arch):
        return build_net(FramesModelConfig(arch=arch, flavour="tiny", image_size=64, num_frames=3, max_text_tokens=12))

    models = {"vlm": vlm(), "allinone": PretrainModel(frames("allinone"), 1.0), "lavender": frames("lavender"),
              "evilm": frames("evilm"),
              "vq": VQTokenizer(VQ_FLAVOURS["tiny"], VQModelConfig(image_size=64, patch=16), vocab_size=100)}
    for name, model in models.items():
        layers = [m for m in model.modules() if isinstance(m, (BertLayer, Block))]
        assert len(layers) >= 2 and transformer_layers(model) == layers, name
    example = frames("example")  # its layers are torch's own: named by the model, found the same way
    assert transformer_layers(example) == list(example.backbone.fusion.layers)
