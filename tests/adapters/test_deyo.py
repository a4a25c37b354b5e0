"""DeYO's rules against hand computations: the entropy and PLPD filters on a constructed case,
the sample weights, the structure-destroying augmentations, one update step on a tiny model,
the trainable set, and a checkpoint round trip through the server's state format."""
import copy
import math
from collections import OrderedDict

import torch
from torch import nn

import adapters
from adapter_models import stream, tiny_cnn
from adapters.common import configure_batch_stats, entropy
from adapters.deyo import destroy_structure, deyo_loss
from runtime.state_format import Unpacker, pack_body, read_body, strict_json

torch.set_num_threads(1)
HP = adapters.REGISTRY["deyo"].validate({})


def _logits(probabilities):
    return torch.tensor(probabilities).log()


def test_entropy_and_plpd_filters_select_exactly_the_right_samples():
    k = 4  # entropy threshold 0.5·ln 4 = 0.693
    p = [[0.97, 0.01, 0.01, 0.01],  # confident; its prediction survives the shuffle: PLPD 0 -> out
         [0.25, 0.25, 0.25, 0.25],  # uncertain -> out at the entropy filter
         [0.01, 0.97, 0.01, 0.01],  # confident; drops to 0.25 when shuffled: PLPD 0.72 -> in
         [0.85, 0.05, 0.05, 0.05],  # entropy 0.59 < 0.693; drops to 0.70: PLPD 0.15 < 0.2 -> out
         [0.05, 0.05, 0.05, 0.85],  # drops to 0.60: PLPD 0.25 -> in
         [0.4, 0.3, 0.2, 0.1]]      # entropy 1.28 -> out
    prime = {0: [0.97, 0.01, 0.01, 0.01], 2: [0.25] * 4, 3: [0.70, 0.1, 0.1, 0.1], 4: [0.1, 0.1, 0.2, 0.6]}
    logits = _logits(p).requires_grad_(True)
    x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 4, 4).contiguous()  # image i is all i
    seen = []

    def net(x_prime):  # the destroyed images keep their value: look their prime prediction up
        ids = x_prime[:, 0, 0, 0].long().tolist()
        seen.append(ids)
        return _logits([prime[i] for i in ids])

    hp = dict(HP, aug_type="occ", occlusion_size=0)  # a no-op occlusion: x' = x
    loss, selected, weight = deyo_loss(net, x, logits, hp, None)
    assert seen == [[0, 2, 3, 4]]  # the second pass sees only the entropy filter's samples
    assert selected.tolist() == [2, 4]
    e = entropy(logits.detach())[[2, 4]]
    plpd = torch.tensor([0.97 - 0.25, 0.85 - 0.6])
    want = 1 / torch.exp(e - 0.4 * math.log(k)) + 1 / torch.exp(-plpd)
    assert torch.allclose(weight, want, atol=1e-6)
    assert torch.allclose(loss, (e * want).mean(), atol=1e-6)
    loss.backward()  # the weights carry no gradient: d loss / d e_i = c_i / n
    assert logits.grad[[0, 1, 3, 5]].abs().max() == 0
    for only_ent, only_plpd in ((True, False), (False, True)):
        _, _, w = deyo_loss(net, x, logits, dict(hp, reweight_ent=only_ent, reweight_plpd=only_plpd), None)
        assert torch.allclose(w, 1 / torch.exp(e - 0.4 * math.log(k)) if only_ent else 1 / torch.exp(-plpd))
    assert deyo_loss(net, x, logits, dict(hp, reweight_ent=False, reweight_plpd=False), None)[2] is None
    assert deyo_loss(net, x, logits, dict(hp, plpd=0.8), None)[0] is None  # all out at the PLPD filter
    assert deyo_loss(net, x, logits, dict(hp, margin=0.01), None)[0] is None  # all out at the entropy filter


def test_patch_shuffle_permutes_the_tiles_of_each_image_by_one_draw():
    n, side = 4, 8
    tile = torch.arange(n * n, dtype=torch.float32).view(n, n).repeat_interleave(2, 0).repeat_interleave(2, 1)
    x = torch.stack([tile, tile + 100]).unsqueeze(1).expand(2, 3, side, side).contiguous()
    out = destroy_structure(x, dict(HP, patch_len=n), torch.Generator().manual_seed(7))
    order = torch.argsort(torch.rand(2, n * n, generator=torch.Generator().manual_seed(7)), dim=-1)
    for b in range(2):
        got = out[b, 0, ::2, ::2].reshape(-1)  # one value per tile, row-major tile order
        assert torch.equal(got, order[b].float() + 100 * b)
        assert torch.equal(out[b, 1], out[b, 0])  # the channels move together
    assert not torch.equal(order[0], order[1])  # one permutation per image


def test_pixel_shuffle_and_occlusion():
    x = torch.rand(3, 3, 6, 6)
    out = destroy_structure(x, dict(HP, aug_type="pixel"), torch.Generator().manual_seed(1))
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, x.reshape(3, 3, 36)[:, :, perm].reshape(3, 3, 6, 6))
    occ = destroy_structure(x, dict(HP, aug_type="occ", occlusion_size=2, row_start=1, column_start=3), None)
    mean = x.mean((2, 3))
    assert torch.allclose(occ[:, :, 1:3, 3:5], mean[:, :, None, None].expand(3, 3, 2, 2))
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[1:3, 3:5] = False
    assert torch.equal(occ[:, :, mask], x[:, :, mask])
    assert not torch.equal(occ, x)


def test_one_update_step_matches_a_hand_computation():
    model = tiny_cnn()
    lr = 1e-3
    hp = {"margin": 1.0, "plpd": -1.0, "lr": lr}
    a = adapters.create("deyo", model, seed=3, **hp)
    x = stream(1, batch=8)[0]
    net = configure_batch_stats(copy.deepcopy(model))
    logits = net(x)
    assert torch.equal(a.predict(x), logits.detach())
    g = torch.Generator().manual_seed(3)
    e = entropy(logits)
    with torch.no_grad():
        prime = net(destroy_structure(x, dict(HP, **hp), g)).softmax(1)
    p = logits.softmax(1)
    label = p.argmax(1, keepdim=True)
    plpd = (p.gather(1, label) - prime.gather(1, label)).view(-1).detach()
    c = torch.exp(-(e.detach() - 0.4 * math.log(10))) + torch.exp(plpd)
    loss = (e * c).mean()
    loss.backward()
    figures = a.learn()
    assert abs(figures["loss"] - float(loss.detach())) < 1e-6 and figures["selected"] == 8
    ours = dict(a.net.named_parameters())
    for n, q in net.named_parameters():
        if n in ("1.weight", "1.bias", "4.weight", "4.bias"):  # Adam's first step: −lr·g/(|g| + eps)
            assert torch.allclose(ours[n], q - lr * q.grad / (q.grad.abs() + 1e-8), atol=1e-7), n
        else:
            assert torch.equal(ours[n], q), n


def test_no_update_when_every_sample_is_filtered():
    a = adapters.create("deyo", tiny_cnn())  # random weights: entropies ~2.26 > 0.5·ln 10
    a.predict(stream(1)[0])
    assert a.learn() == {"selected": 0.0}
    assert a.weight_distance() == 0 and not a.optimizer.state


def test_the_reference_leaves_top_blocks_frozen():
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4),
        layer4=nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), norm=nn.BatchNorm2d(4),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 10))).eval()
    a = adapters.create("deyo", model)
    assert [n for n, _ in a.trainable] == ["bn.weight", "bn.bias"]


def test_checkpoint_through_the_state_format_resumes_bit_for_bit():
    model = tiny_cnn()
    batches = stream(6)
    hp = {"margin": 1.0, "plpd": -1.0}
    a = adapters.create("deyo", model, **hp)
    for x in batches[:3]:
        a.step(x)
    body = pack_body(a.state_dict(), "stream-1", "fingerprint")
    metadata, tensors = read_body(body)
    b = adapters.create("deyo", model, seed=42, **hp)
    b.load_state_dict(Unpacker(tensors)(strict_json(metadata["record"])))
    for x in batches[3:]:
        assert torch.equal(a.step(x), b.step(x))
