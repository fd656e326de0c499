"""Reference quantizers: fp8 codes, int4 packing and error bounds, KVSpec arithmetic."""

import pytest
import torch

from kvmem import InvalidArgument, KVSpec
from kvmem.formats import (
    FP8_MAX,
    dequantize_fp8,
    dequantize_int4,
    fp8_scales,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    resolve_format,
    unpack_int4,
)

F8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@pytest.mark.parametrize("fmt", list(F8))
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_codes_equal_torch_cast_of_clamped_ratio(fmt, per_head):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, 16, generator=g) * 300  # some values saturate at scale 1
    scale = torch.rand(4, generator=g) + 0.5 if per_head else torch.tensor(0.75)
    codes = quantize_fp8(x, scale, fmt)
    s = scale[:, None] if per_head else scale
    expect = (x / s).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).to(F8[fmt]).view(torch.uint8)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, expect)
    back = dequantize_fp8(codes, scale, fmt)
    assert torch.isfinite(back).all()
    assert back.abs().max() <= FP8_MAX[fmt] * s.max() + 1e-3


def test_fp8_e4m3_saturates_and_rounds_to_nearest_even():
    x = torch.tensor([[1e6, -1e6, 1.0625, 1.1875, 3.0]])[..., None].transpose(0, 1)
    vals = dequantize_fp8(quantize_fp8(x, 1.0), 1.0).flatten().tolist()
    # 1.0625 is halfway between 1.0 (even) and 1.125; 1.1875 between 1.125 and 1.25 (even)
    assert vals == [448.0, -448.0, 1.0, 1.25, 3.0]


def test_fp8_calibration_per_tensor_and_per_head():
    x = torch.zeros(10, 3, 8)
    x[:, 0] = 2.0
    x[:, 1] = -896.0
    per_head = fp8_scales(x, per_head=True)
    assert per_head.tolist() == pytest.approx([2 / 448, 2.0, 1.0])  # all-zero head gets 1
    per_tensor = fp8_scales(x)
    assert per_tensor.tolist() == pytest.approx([2.0] * 3)


def test_fp8_scale_shape_mismatch_is_rejected():
    with pytest.raises(InvalidArgument):
        quantize_fp8(torch.randn(4, 3, 8), torch.ones(5))


def test_int4_packing_order():
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x21, 0xF3]]  # element 2i in bits 0-3, 2i+1 in bits 4-7
    assert torch.equal(unpack_int4(packed), codes)


def _int4_cases():
    g = torch.Generator().manual_seed(2)
    yield torch.randn(32, 4, 64, generator=g)
    yield torch.randn(32, 4, 64, generator=g) * 1e-3
    yield 1000 + torch.rand(32, 4, 64, generator=g)  # large offset, tiny spread
    yield -torch.rand(32, 4, 64, generator=g) * 50  # negative only
    yield torch.full((8, 2, 64), 3.5)  # constant groups
    yield torch.zeros(8, 2, 64)


@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_round_trip_within_half_scale(group, dtype):
    for x in _int4_cases():
        x = x.to(dtype)
        packed, scale, zero = quantize_int4(x, group)
        assert packed.shape == (*x.shape[:-1], 32) and packed.dtype == torch.uint8
        assert scale.dtype == zero.dtype == torch.float16
        assert scale.shape == (*x.shape[:-1], 64 // group)
        codes = unpack_int4(packed)
        assert int(codes.max()) <= 15
        back = dequantize_int4(packed, scale, zero)
        err = (back - x.float()).abs().unflatten(-1, (64 // group, group))
        bound = scale.float()[..., None] / 2
        # float32 evaluation of (code - zero) * scale adds at most a few ulps of |x|
        slack = 4 * torch.finfo(torch.float32).eps * x.float().abs().unflatten(-1, err.shape[-2:])
        assert (err <= bound * (1 + 1e-6) + slack).all(), float((err - bound).max())


def test_int4_group_must_divide_head_dim():
    with pytest.raises(InvalidArgument):
        quantize_int4(torch.randn(2, 2, 48), 32)
    with pytest.raises(InvalidArgument):
        KVSpec(2, 2, 48, kv_format="int4", group_size=32)
    with pytest.raises(InvalidArgument):
        KVSpec(2, 2, 64, kv_format="fp16", group_size=32)


def test_spec_byte_arithmetic():
    llama = KVSpec(32, 8, 128)
    assert llama.bytes_per_token == 32 * 8 * 128 * 2 * 2
    assert llama.bytes_per_page(16) == 16 * llama.bytes_per_token
    fp8 = KVSpec(32, 8, 128, kv_format="fp8")
    assert fp8.kv_format == "fp8_e4m3" and fp8.bytes_per_token == llama.bytes_per_token // 2
    i4 = KVSpec(1, 1, 128, kv_format="int4", group_size=32)
    assert i4.bytes_per_token == 2 * (64 + 4 * 4)  # codes + fp16 scale and zero per group
    assert KVSpec(1, 1, 8, dtype=torch.bfloat16).kv_format == "bf16"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_layers=0, num_kv_heads=1, head_dim=8),
        dict(num_layers=1, num_kv_heads=-1, head_dim=8),
        dict(num_layers=1, num_kv_heads=1, head_dim=8, kv_format="int3"),
        dict(num_layers=1, num_kv_heads=1, head_dim=8, fp8_scale="row"),
        dict(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.int8),
    ],
)
def test_bad_specs_are_rejected(kwargs):
    with pytest.raises(InvalidArgument):
        KVSpec(**kwargs)


def test_format_names():
    assert resolve_format("auto", torch.float32).name == "fp32"
    assert resolve_format("FP8").name == "fp8_e4m3"
    assert resolve_format("int4").code_dim(128) == 64
