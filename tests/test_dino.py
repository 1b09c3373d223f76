"""pretrain_dino.py: its loss, centre and teacher-temperature warm-up against lightly's DINOLoss, its head
against lightly's DINOProjectionHead, per-parameter clipping, one step's parts (the last layer kept still in
the first epoch, the teacher's EMA, the centre's), the centre through a checkpoint, the ViT path with its
local views in whole patches, and the configs. Multi-crop's views: tests/test_augment.py. Resume after
SIGKILL, the 2-process run, --compile: the tests over every method (tests/test_resume.py, test_ddp.py, ...)."""
import pytest
import torch

import pretrain_dino
from common import cli, pretrain
from common.errors import UserError
from conftest import REPO


@pytest.mark.parametrize("n_local", [0, 4])
def test_loss_centre_and_temperature_warm_up_equal_lightlys_dino_loss(n_local):
    """Consecutive steps across the teacher-temperature warm-up (0.04 to 0.07 over 30 epochs) and after it:
    the loss of each, and the centre it leaves for the next."""
    from lightly.loss import DINOLoss  # requirements-test.txt: a missing lightly fails, never skips
    n, dim = 8, 32
    theirs = DINOLoss(output_dim=dim, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                      student_temp=0.1, center_momentum=0.9)
    center = torch.zeros(dim)
    g = torch.Generator().manual_seed(0)
    for epoch in (0, 1, 13, 29, 30, 45):
        teacher = [torch.randn(n, dim, generator=g) * 3 for _ in range(2)]
        student = [torch.randn(n, dim, generator=g) * 3 for _ in range(2 + n_local)]
        expected = theirs(teacher, student, epoch=epoch)
        tau = pretrain_dino.teacher_temperature(epoch, 0.04, 0.07, 30)
        teacher_out = torch.stack(teacher)
        loss = pretrain_dino.dino_loss(teacher_out, torch.stack(student), center, torch.tensor(tau), 0.1)
        pretrain_dino.update_center(center, teacher_out.mean(dim=(0, 1)), 0.9)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(center, theirs.center.view(-1), rtol=1e-6, atol=1e-6)
    assert center.abs().sum() > 0
    assert [pretrain_dino.teacher_temperature(e, 0.04, 0.07, 30) for e in (0, 29, 30)] == [0.04, 0.07, 0.07]


@pytest.mark.filterwarnings("ignore:.*weight_norm:FutureWarning")  # lightly's head uses the older weight_norm
@pytest.mark.parametrize("norm_last_layer, batchnorm", [(True, False), (False, False), (True, True)])
def test_head_equals_lightlys_dino_projection_head(norm_last_layer, batchnorm):
    from lightly.models.modules import DINOProjectionHead
    torch.manual_seed(0)
    theirs = DINOProjectionHead(24, 40, 16, 96, batch_norm=batchnorm, norm_last_layer=norm_last_layer)
    ours = pretrain_dino.DINOHead(24, 40, 16, 96, norm_last_layer=norm_last_layer, batchnorm=batchnorm)
    assert [type(m) for m in ours.mlp] == [type(m) for m in theirs.layers]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert 0.015 < ours.mlp[0].weight.std() < 0.025                      # DINO's truncated normal, std 0.02
    ours.mlp.load_state_dict(theirs.layers.state_dict())
    with torch.no_grad():
        ours.last_direction.copy_(theirs.last_layer.weight_v)
        ours.last_magnitude.copy_(theirs.last_layer.weight_g * torch.linspace(0.5, 2, 96)[:, None])
        theirs.last_layer.weight_g.copy_(ours.last_magnitude)
    x = torch.randn(10, 24)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert ours.last_magnitude.requires_grad == theirs.last_layer.weight_g.requires_grad == (not norm_last_layer)


def test_clipping_scales_each_parameters_gradient_to_the_norm_at_most():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((4, 3), (5,), (2, 2), (7,))]
    for p, scale in zip(params, (10.0, 0.1, 3.0, 1.0)):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * scale
    params[3].grad = None
    before = [None if p.grad is None else p.grad.clone() for p in params]
    pretrain_dino.clip_each(params, 3.0)
    for p, grad in zip(params[:3], before):                  # Caron et al.'s clip_gradients, parameter by parameter
        norm = grad.norm()
        expected = grad * (3.0 / (norm + 1e-6)) if 3.0 / (norm + 1e-6) < 1 else grad
        torch.testing.assert_close(p.grad, expected)
    assert params[0].grad.norm() == pytest.approx(3.0, rel=1e-5) and torch.equal(params[1].grad, before[1])
    assert params[3].grad is None


def built(flags, n_images=16, steps=1, seed=0):
    args = pretrain_dino.get_args_parser().parse_args(
        ["--arch", "resnet18", "--head-hidden", "32", "--head-bottleneck", "16", "--out-dim", "64", "--local-crops",
         "2", "--batch-size", "8", "--in-chans", "1", "--warmup-epochs", "0", "--lr", "1e-3", *flags])
    images = torch.randint(0, 256, (n_images, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    run = pretrain.in_memory(vars(args), images, "cpu", steps=steps)
    return pretrain_dino.build(args, run), images, run, args


def test_a_step_keeps_the_last_layer_still_in_the_first_epoch_then_moves_teacher_and_centre():
    method, images, run, args = built(["--epochs", "3", "--ema", "0.9", "--ema-schedule", "constant"])
    head, teacher_head = method.modules["head"], method.modules["teacher_head"]
    center = method.state["center"]
    first_layer = head.mlp[0].weight
    for i in range(2):  # epoch 0 (1 step per epoch), then epoch 1
        direction, mlp, teacher = head.last_direction.clone(), first_layer.clone(), teacher_head.mlp[0].weight.clone()
        old_center = center.clone()
        loss, figures = method.step(images[i * 8:(i + 1) * 8], i)
        assert torch.isfinite(loss) and figures["teacher_temp"] == pretrain_dino.teacher_temperature(i, 0.04, 0.07, 30)
        assert not torch.equal(first_layer, mlp)                         # the MLP trains from the first step
        assert torch.equal(head.last_direction, direction) == (i == 0)   # the last layer from the second epoch
        assert torch.equal(head.last_magnitude, torch.ones_like(head.last_magnitude))  # --norm-last-layer
        torch.testing.assert_close(teacher_head.mlp[0].weight, 0.9 * teacher + 0.1 * first_layer)
        assert not torch.equal(center, old_center) and method.state["center"] is center
    # the weight decay follows its cosine from --weight-decay to --weight-decay-end over the 3 steps
    weights, flat = method.optimizer.param_groups
    assert weights["weight_decay"] == pytest.approx(0.04 + (0.4 - 0.04) * 0.25)
    # biases and normalisation weights never decay (Caron et al.'s code)
    assert flat["weight_decay"] == 0.0 and flat["params"] and all(p.ndim == 1 for p in flat["params"])
    assert all(p.ndim > 1 for p in weights["params"])


def test_the_centre_is_the_mean_teacher_output_and_round_trips_through_a_checkpoint(tmp_path):
    method, images, run, args = built(["--epochs", "1", "--center-momentum", "0"], steps=2)
    run.out = str(tmp_path)
    pretrain.train(method, run)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.equal(saved["center"], method.state["center"]) and saved["center"].abs().sum() > 0
    fresh, _, _, _ = built(["--epochs", "1"])
    pretrain.restore_state(fresh.state, saved)
    assert torch.equal(fresh.state["center"], method.state["center"])
    # with momentum 0 the centre is the last batch's mean teacher output, a softmax input of out_dim values
    assert saved["center"].shape == (64,)


def test_vit_local_views_are_whole_patches_and_a_step_trains_it():
    method, images, run, args = built(["--arch", "vit_tiny_patch16_224", "--epochs", "2"])
    assert "2 local views of 12 px" in method.summary                 # 96/224 of 28 px, 3 patches of 4 px
    encoder = method.modules["encoder"]
    before = encoder.pos_embed.clone()
    loss, _ = method.step(images[:8], 0)
    assert torch.isfinite(loss) and not torch.equal(encoder.pos_embed, before)
    parser = pretrain_dino.get_args_parser()
    with pytest.raises(UserError, match="--local-size 28 is not whole 8 px patches"):
        pretrain_dino.check(parser.parse_args(["--arch", "vit_tiny_patch16_224", "--size", "64", "--local-size", "28"]))
    with pytest.raises(UserError, match="no random resized crop"):
        pretrain_dino.check(parser.parse_args(["--aug", "vflip+blur"]))
    with pytest.raises(UserError, match="--local-crop-scale needs MIN <= MAX"):
        pretrain_dino.check(parser.parse_args(["--local-crop-scale", "0.4", "0.1"]))
    pretrain_dino.check(parser.parse_args(["--arch", "vit_tiny_patch16_224", "--size", "64"]))
    pretrain_dino.check(parser.parse_args(["--aug", "vflip+blur", "--local-crops", "0"]))


def test_the_teacher_is_the_students_copy_and_takes_no_gradient():
    method, images, _, _ = built(["--epochs", "1"])
    modules = method.modules
    for student, teacher in (("encoder", "teacher_encoder"), ("head", "teacher_head")):
        a, b = modules[student].state_dict(), modules[teacher].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not any(p.requires_grad for p in modules[teacher].parameters())
    trained = {id(p) for group in method.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for name in ("encoder", "head") for p in modules[name].parameters() if p.requires_grad}


@pytest.mark.parametrize("name, arch, batch, out_dim, locals_", [("cpu_dino", "resnet18", 64, 1024, 6),
                                                                 ("dino", "vit_small_patch16_224", 1024, 65536, 6)])
def test_configs_parse(name, arch, batch, out_dim, locals_):
    args = cli.parse_args(pretrain_dino.get_args_parser(), ["--config", f"{REPO}/configs/{name}.yaml"])
    assert (args.arch, args.batch_size, args.out_dim, args.local_crops) == (arch, batch, out_dim, locals_)
    assert args.optimizer == "adamw" and args.lr_schedule == "cosine"
    assert args.local_crop_scale == [0.05, 0.4] and args.crop_scale == [0.4, 1.0] and args.aug == "byol"
    assert args.head_bn == (arch == "resnet18")                         # BatchNorm in the head of a ResNet
    pretrain_dino.check(args)
