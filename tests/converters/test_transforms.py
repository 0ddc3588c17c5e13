"""Each rewrite of converters/transforms.py must leave the fp model's output unchanged.

Tolerance: the rewrites are exact in real arithmetic; in fp32 each adds one rotation or
permutation of the weights (a few ulps per entry), which moves logits of magnitude ~3 by
~1e-5 at most through 2 layers. 1e-4 absolute is 10x that margin and 1000x below the effect
of any real mistake (a wrong rotation or permutation changes logits by O(1)).
"""

import pytest
import torch

from vllm_quamba.converters import transforms
from vllm_quamba.converters.reorder import sort_and_cluster
from vllm_quamba.converters.simulate import Mamba2Reference
from vllm_quamba.converters.source import load_source
from vllm_quamba.format import Mamba2Shapes

from tests.tiny_models import make_tiny_mamba2

ATOL = 1e-4


@pytest.fixture(scope="module", params=[1, 2], ids=["1group", "2groups"])
def model_dir(request, tmp_path_factory):
    return make_tiny_mamba2(tmp_path_factory.mktemp("m"), n_groups=request.param, chunk_size=16)


@pytest.fixture(scope="module")
def source(model_dir):
    return load_source(model_dir)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(1))


def _logits(source, tensors, ids, online_hadamard=False):
    return Mamba2Reference(source.config, tensors, online_hadamard=online_hadamard).logits(ids)


def test_reference_matches_transformers(random_tiny_mamba2, ids):
    """One SSD group only: transformers' gated RMSNorm ignores n_groups (kernels test the grouped norm)."""
    from transformers import Mamba2ForCausalLM

    source = load_source(random_tiny_mamba2)
    with torch.no_grad():
        expected = Mamba2ForCausalLM.from_pretrained(random_tiny_mamba2).eval()(ids[None]).logits[0]
    torch.testing.assert_close(_logits(source, source.tensors, ids), expected, atol=ATOL, rtol=0)


def test_fold_norms_is_invariant(source, ids):
    norm = "backbone.layers.0.norm.weight"
    assert not torch.equal(source.tensors[norm], torch.ones_like(source.tensors[norm])), "folding would be a no-op"
    folded = transforms.fold_norms(source.tensors)
    assert torch.equal(folded[norm], torch.ones_like(folded[norm]))
    torch.testing.assert_close(_logits(source, folded, ids), _logits(source, source.tensors, ids), atol=ATOL, rtol=0)


def test_hadamard_rotation_is_invariant(source, ids):
    folded = transforms.fold_norms(source.tensors)
    rotated = transforms.rotate_residual(folded)
    assert not torch.allclose(rotated["backbone.embeddings.weight"], folded["backbone.embeddings.weight"])
    torch.testing.assert_close(_logits(source, rotated, ids), _logits(source, folded, ids), atol=ATOL, rtol=0)
    fused = transforms.fuse_out_proj_hadamard(rotated)
    torch.testing.assert_close(
        _logits(source, fused, ids, online_hadamard=True), _logits(source, folded, ids), atol=ATOL, rtol=0
    )


def test_permutation_is_invariant(source, ids):
    shapes = Mamba2Shapes.from_config(source.config)
    stat = torch.rand(shapes.intermediate_size, generator=torch.Generator().manual_seed(3))
    reordering = sort_and_cluster(stat, shapes)
    assert not torch.equal(reordering.channel_index, torch.arange(shapes.intermediate_size))
    permuted = source.tensors
    for layer in range(shapes.num_layers):
        permuted = transforms.permute_mamba2(permuted, shapes, layer, reordering.head_index, reordering.channel_index)
    torch.testing.assert_close(_logits(source, permuted, ids), _logits(source, source.tensors, ids), atol=ATOL, rtol=0)
