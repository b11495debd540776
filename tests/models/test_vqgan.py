"""The VQ-GAN image tokenizer (models/vqgan.py): pixels -> codes -> pixels, eager and compiled."""

import pytest
import torch

import mmcompile as mmc
from mmcompile.models import chameleon, vqgan


@pytest.fixture(scope="module")
def vq():
    return vqgan.build("tiny", seed=0)


def test_encode_gives_one_code_per_grid_cell_and_decode_gives_pixels(vq):
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        codes = vq.encode(pixels)
        assert codes.shape == (2, 64) and codes.dtype == torch.long
        assert 0 <= int(codes.min()) and int(codes.max()) < vq.config.num_embeddings
        # each code is the nearest codebook entry of its latent vector
        z = vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1).reshape(2, 64, -1)
        assert torch.equal(codes, torch.cdist(z, vq.codebook.weight[None].expand(2, -1, -1)).argmin(-1))
        image = vq.decode(codes)
    assert image.shape == (2, 3, 32, 32) and float(image.abs().max()) <= 1
    # the tiny tokenizer's grid is the tiny decoder's image: 64 codes
    assert vq.config.grid ** 2 == chameleon.CONFIGS["tiny"].image_codes == vq.config.num_embeddings


@pytest.mark.parametrize("phase", ["encode", "decode"])
def test_both_phases_go_through_capture_and_the_default_pipeline(vq, phase):
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        codes = vq.encode(pixels)
    module, arg = (vqgan.Encode(vq), pixels) if phase == "encode" else (vqgan.Decode(vq), codes)
    result = mmc.optimize(mmc.capture(module, (arg,)), "default", verify=True)
    with torch.no_grad():
        ref = module(arg)
        for backend in ("eager",):  # through Inductor: Chameleon's compiled tasks (tests/models/test_chameleon_tasks.py)
            out = mmc.lower(result.program, backend)(arg)
            if phase == "encode":
                assert torch.equal(out, ref)  # the same codes
            else:
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_the_chameleon_tokenizer_shape_and_bad_configs():
    c = vqgan.CONFIGS["7b"]
    assert (c.resolution, c.grid, c.grid ** 2, c.num_embeddings) == (512, 32, 1024, 8192)
    assert c.num_embeddings == chameleon.CONFIGS["7b"].image_codes
    with pytest.raises(ValueError, match="multiple of 32"):
        vqgan.VQGANConfig(base_channels=48)
    with pytest.raises(ValueError, match="resolution=100 must be a multiple of 16"):
        vqgan.VQGANConfig(resolution=100)
    with pytest.raises(ValueError, match="unknown VQ-GAN config 'huge'"):
        vqgan.build("huge")
