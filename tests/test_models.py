"""The default model (models/projected.py) and DiffAugment (augment.py), as specifications."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from neighbourhoods.models import discriminator, generator, projected
from neighbourhoods.train.augment import diffaugment, parse_policy


@pytest.fixture(scope="module")
def square():
    torch.manual_seed(0)
    return projected.build(num_classes=3, res=(64, 64))


@pytest.fixture(scope="module")
def four_by_three():
    torch.manual_seed(0)
    return projected.build(num_classes=3, res=(48, 64))


def _inputs(G, n=4, labels=None):
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(1))
    y = torch.tensor(labels if labels is not None else [0, 1, 2, 0][:n])
    return z, y


@pytest.mark.parametrize("model", ["square", "four_by_three"])
def test_generator_makes_images_of_the_requested_shape_in_range(model, request):
    G, _ = request.getfixturevalue(model)
    z, y = _inputs(G)
    x = G.eval()(z, y)
    assert x.shape == (4, 3, *G.res)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("model", ["square", "four_by_three"])
def test_discriminator_gives_logits_with_leading_batch_dim(model, request):
    G, D = request.getfixturevalue(model)
    z, y = _inputs(G)
    logits = D(G(z, y), y)
    assert logits.shape[0] == 4 and logits.ndim == 2 and torch.isfinite(logits).all()


def test_resolutions_used_by_the_project_all_build():
    for res in [(64, 64), (48, 64), (96, 128), (192, 256)]:
        G = generator.Generator(2, res)
        assert G(torch.randn(2, G.z_dim), torch.tensor([0, 1])).shape == (2, 3, *res)


@pytest.mark.parametrize("res,level,size", [((64, 64), 1, (8, 8)), ((48, 64), 1, (6, 8)), ((96, 128), 2, (12, 16)),
                                            ((192, 256), 3, (24, 32)), ((32, 32), 1, (8, 8))])
def test_the_city_reaches_g_at_an_eighth_of_the_image_whatever_its_size(res, level, size):
    """The recipe's g_cond_from is the level whose shorter side is 1/8 of the image's (at least
    level 1, so the base map stays the latent's alone): one rule for 64x64 and the website's 96x128."""
    assert projected.city_level(res) == level == projected.recipe_kwargs(res)["g_cond_from"]
    G = projected.build_generator(2, res, **projected.recipe_kwargs(res)).eval()
    seen = []
    hook = G.blocks[level - 1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        G(torch.randn(1, G.z_dim), torch.tensor([0]))
    hook.remove()
    assert seen == [size] and G.cond_from == level


def test_the_default_model_takes_a_training_step_at_the_gpu_size_192x256():
    # the recipe as a GPU would run it: G and D built at 192x256, one D and one G update
    from neighbourhoods.train.loss import GANLoss

    torch.manual_seed(0)
    G, D = projected.build(num_classes=2, res=(192, 256), **projected.recipe_kwargs((192, 256)))
    loss = GANLoss(G=G, G_train=G, D=D, D_train=D, kind=projected.LOSS, augment=projected.AUGMENT_POLICY,
                   mode_seeking=0.5, layout_weight=1.0)
    z, labels = torch.randn(2, G.z_dim), torch.tensor([0, 1])
    fakes = loss.fakes(z=z, labels=labels)
    real = torch.rand(2, 3, 192, 256) * 2 - 1
    assert fakes.images.shape == real.shape
    loss.discriminator(real=real, labels=labels, fakes=fakes)[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)
    loss.generator(fakes=fakes)[0].backward()
    grads = [p.grad for p in G.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_g_without_noise_injection_has_no_noise_and_runs_written_before_build_with_it():
    without = projected.build_generator(2, (48, 64), g_noise=False)
    assert not any(isinstance(m, generator.NoiseInjection) for m in without.modules())
    assert not any("noises" in k for k in without.state_dict())
    before = projected.build_generator(2, (48, 64))    # a config.json without g_noise: the noise it trained with
    assert any("noises" in k for k in before.state_dict())
    without.train()
    z, y = torch.randn(2, without.z_dim), torch.tensor([0, 1])
    torch.manual_seed(1)
    a = without(z, y)
    torch.manual_seed(2)
    assert torch.equal(a, without(z, y))   # no noise: training-mode samples need no RNG either


def test_layout_lock_keeps_the_sample_on_its_layout_where_g_alone_strays():
    """With `layout_lock`, G's residual has no layout of its own: however loud G's RGB head, the
    sample averaged down to the layout's size stays near its layout; without it, it strays."""
    def stray(lock: bool) -> float:
        torch.manual_seed(0)
        G = projected.build_generator(2, (48, 64), g_cond_from=1, layouts=4, layout_lock=lock).eval()
        G.layouts.basis.normal_(0, 0.05)
        G.layouts.chol.copy_(torch.eye(G.layouts.chol.shape[-1]).expand_as(G.layouts.chol))
        G.to_rgb.weight.data.mul_(10)   # a G that paints over the layout as hard as it can
        z, y = torch.randn(16, G.z_dim), torch.zeros(16, dtype=torch.long)
        with torch.no_grad():
            layouts, x = G.layouts.sample(z, y), G(z, y)
        return (F.adaptive_avg_pool2d(x, layouts.shape[-2:]) - layouts).square().mean().item()

    free, locked = stray(False), stray(True)
    assert locked < 0.2 * free, (locked, free)


def test_z_skip_lets_the_latent_reach_every_level_not_only_the_base_map():
    """With `g_z_skip` every conditional BatchNorm sees z beside the city (BigGAN's skip-z):
    with z cut out of the base map, two latents still draw two images; without it, one."""
    def spread(skip: bool) -> float:
        torch.manual_seed(0)
        G = projected.build_generator(2, (48, 64), g_cond_from=1, g_noise=False, g_z_skip=skip).eval()
        with torch.no_grad():
            G.fc.weight[:, :G.z_dim] = 0   # the base map no longer sees z
            for m in G.modules():
                if isinstance(m, generator.ConditionalBatchNorm):
                    m.gain.weight.normal_(0, 0.1)
                    m.bias.weight.normal_(0, 0.1)
            x = G(torch.randn(2, G.z_dim), torch.zeros(2, dtype=torch.long))
        return (x[0] - x[1]).abs().mean().item()

    assert spread(False) < 1e-6
    assert spread(True) > 1e-3


def test_resolution_that_cannot_be_reached_by_upsampling_is_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        generator.Generator(2, (50, 66))


def test_city_changes_the_generated_image():
    torch.manual_seed(0)
    G = generator.Generator(num_classes=3, res=(48, 64)).eval()
    z = torch.randn(1, G.z_dim).repeat(2, 1)
    out = G(z, torch.tensor([0, 1]))
    # Same noise, different city: the city embedding (joined to z) must change the picture.
    assert not torch.allclose(out[0], out[1], atol=1e-6)




def test_eval_samples_depend_only_on_noise_and_city_not_on_the_batch():
    torch.manual_seed(0)
    G = generator.Generator(num_classes=3, res=(48, 64))
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, generator.NoiseInjection):
                m.weight.fill_(0.5)  # trained generators inject noise; eval must still be deterministic
    G.eval()
    z = torch.randn(3, G.z_dim)
    y = torch.tensor([0, 1, 2])
    alone = G(z[1:2], y[1:2])
    torch.manual_seed(123)
    together = G(z, y)
    assert torch.allclose(alone[0], together[1], atol=1e-5)


def test_city_changes_the_discriminator_logits(square):
    G, D = square
    x = torch.rand(1, 3, 64, 64).repeat(2, 1, 1, 1) * 2 - 1
    with torch.no_grad():
        for head in D.heads:
            head.embed.weight.normal_()
    D.eval()
    logits = D(x, torch.tensor([0, 1]))
    assert not torch.allclose(logits[0], logits[1])


def test_generator_gets_gradients_through_the_frozen_discriminator(square):
    G, D = square
    G.train()
    D.train()
    G.zero_grad()
    z, y = _inputs(G)
    (-D(diffaugment(G(z, y), projected.AUGMENT_POLICY), y).mean()).backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None]
    # NoiseInjection weights start at 0 but still get a gradient; every G parameter must learn.
    assert missing == []
    assert all(p.grad is None for p in D.feature_net.parameters())


def test_discriminator_step_updates_heads_but_never_the_feature_net(square):
    G, D = square
    D.train()
    feature_state = {k: v.clone() for k, v in D.feature_net.state_dict().items()}
    opt = torch.optim.Adam(D.trainable_parameters(), lr=1e-3)
    head_before = D.heads[0].out.weight_orig.clone()  # spectral-norm'd conv's raw weight
    z, y = _inputs(G)
    real = torch.rand(4, 3, 64, 64) * 2 - 1
    for _ in range(2):
        loss = torch.relu(1 - D(real, y)).mean() + torch.relu(1 + D(G(z, y).detach(), y)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(head_before, D.heads[0].out.weight_orig)
    for k, v in D.feature_net.state_dict().items():
        assert torch.equal(v, feature_state[k]), f"frozen feature net changed: {k}"
    assert not D.feature_net.training
    assert all(not p.requires_grad for p in D.feature_net.parameters())
    assert set(map(id, D.trainable_parameters())).isdisjoint(map(id, D.feature_net.parameters()))


@pytest.mark.parametrize("res, min_side, seen", [((64, 64), 96, (128, 128)), ((48, 64), 96, (96, 128)),
                                                 ((32, 32), 96, (128, 128)), ((96, 128), 96, (96, 128)),
                                                 ((64, 64), 0, (64, 64))])
def test_the_feature_net_sees_small_images_enlarged_by_octaves_to_its_minimum_side(res, min_side, seen):
    _, D = projected.build(num_classes=2, res=res, g_max_channels=16, g_min_channels=8, d_head_width=8,
                           feature_min_side=min_side)
    shapes = []
    hook = D.feature_net.stem.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        logits = D.eval()(torch.zeros(2, 3, *res), torch.tensor([0, 1]))
    hook.remove()
    assert shapes == [seen] and logits.shape[0] == 2




def test_frozen_mixing_is_the_same_for_every_discriminator():
    a = discriminator.FrozenFeatures()
    b = discriminator.FrozenFeatures()
    assert torch.equal(a.ccm[0].weight, b.ccm[0].weight)


def test_diffaugment_keeps_shape_and_is_differentiable():
    x = torch.rand(4, 3, 48, 64, requires_grad=True)
    y = diffaugment(x, "color,translation,cutout")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diffaugment_changes_images_and_empty_policy_does_not():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(diffaugment(x, ""), x)
    for policy in ["color", "translation", "cutout"]:
        assert not torch.equal(diffaugment(x, policy), x), policy


def test_cutout_zeroes_a_quarter_of_each_image():
    x = torch.ones(8, 3, 32, 32)
    y = diffaugment(x, "cutout")
    zero_fraction = (y == 0).float().mean(dim=(1, 2, 3))
    assert torch.all(zero_fraction > 0.05) and torch.all(zero_fraction <= 0.25 + 1e-6)


def test_diffaugment_is_reproducible_from_the_torch_seed():
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(3)
    a = diffaugment(x, projected.AUGMENT_POLICY)
    torch.manual_seed(3)
    b = diffaugment(x, projected.AUGMENT_POLICY)
    assert torch.equal(a, b)




def test_unknown_augment_op_is_named_in_the_error():
    with pytest.raises(ValueError, match="rotate"):
        parse_policy("color,rotate")
