"""The judge: a small CNN that names the shape, colour and texture of a world image.

Shapes and colours each have an extra "none" class, learned from blobs, scribbles, empty
backgrounds and off-palette colours, so that an erased circle that became a blob is reported as
"none" rather than forced into the nearest shape.
"""
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from . import world

SHAPE_CLASSES = world.SHAPES + ["none"]
COLOUR_CLASSES = world.COLOURS + ["none"]
TEXTURE_CLASSES = world.TEXTURES
IGNORE = -100  # texture label of images without a textured object


class JudgeNet(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 pixels) and one linear head per attribute."""

    def __init__(self):
        super().__init__()
        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*stage(3, 24), *stage(24, 48), *stage(48, 64), nn.Flatten(),
                                      nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.shape = nn.Linear(128, len(SHAPE_CLASSES))
        self.colour = nn.Linear(128, len(COLOUR_CLASSES))
        self.texture = nn.Linear(128, len(TEXTURE_CLASSES))

    def forward(self, images):
        """images: (N, 3, 32, 32) in [0, 1] -> logits for shape, colour, texture."""
        h = self.features(images * 2 - 1)
        return self.shape(h), self.colour(h), self.texture(h)


def _example(rng):
    """One judge example: (image, shape index, colour index, texture index).

    60% world images, 12% world shapes in off-palette colours (colour "none"), 14% blobs,
    7% scribbles (shape "none"; blobs and scribbles in palette or off-palette colours) and
    7% empty backgrounds (shape and colour "none").
    """
    kind = rng.random()
    shape = world.SHAPES[rng.integers(4)]
    texture = world.TEXTURES[rng.integers(2)]
    texture_idx = TEXTURE_CLASSES.index(texture)
    no_shape, no_colour = SHAPE_CLASSES.index("none"), COLOUR_CLASSES.index("none")
    if kind < 0.6:
        colour = world.COLOURS[rng.integers(4)]
        return (world.draw(shape, colour, texture, rng), SHAPE_CLASSES.index(shape),
                COLOUR_CLASSES.index(colour), texture_idx)
    off_palette = world.OFF_PALETTE_RGB[rng.integers(len(world.OFF_PALETTE_RGB))]
    if kind < 0.72:
        return world.draw(shape, off_palette, texture, rng), SHAPE_CLASSES.index(shape), no_colour, texture_idx
    if kind < 0.93:
        colour = world.COLOURS[rng.integers(4)] if rng.random() < 0.6 else None
        rgb = world.RGB[colour] if colour else off_palette
        colour_idx = COLOUR_CLASSES.index(colour) if colour else no_colour
        if kind < 0.86:
            return world.draw_blob(rgb, texture, rng), no_shape, colour_idx, texture_idx
        return world.draw_scribble(rgb, rng), no_shape, colour_idx, IGNORE
    return world.draw_background(rng), no_shape, no_colour, IGNORE


def make_dataset(n, seed):
    """n random judge examples as tensors: images (n, 3, 32, 32) and three label vectors."""
    rng = np.random.default_rng(seed)
    examples = [_example(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([e[0] for e in examples])).permute(0, 3, 1, 2).contiguous()
    labels = [torch.tensor([e[i] for e in examples]) for i in (1, 2, 3)]
    return images, labels


def _augment(images, generator):
    """Blur some images and add pixel noise, so the judge tolerates imperfect generated images."""
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(images.shape[0], 1, 1, 1, generator=generator) * 0.6
    images = images * (1 - mix) + blurred * mix
    noise = torch.randn(images.shape, generator=generator) * torch.rand(images.shape[0], 1, 1, 1, generator=generator) * 0.05
    return (images + noise).clamp(0, 1)


def train_judge(steps=1500, batch_size=128, n_train=30000, seed=0, log=print):
    """Train a judge from scratch on freshly drawn examples; returns the model in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = make_dataset(n_train, seed)
    model = JudgeNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=generator)
        logits = model(_augment(images[idx], generator))
        loss = sum(F.cross_entropy(lg, lb[idx], ignore_index=IGNORE) for lg, lb in zip(logits, labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"judge step {step}/{steps} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def classify(model, images, batch_size=256):
    """Judge images (N, 3, 32, 32) in [0, 1]: a dict of label-name lists for shape/colour/texture."""
    out = {"shape": [], "colour": [], "texture": []}
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size].float())
        for key, lg, classes in zip(out, logits, (SHAPE_CLASSES, COLOUR_CLASSES, TEXTURE_CLASSES)):
            out[key] += [classes[i] for i in lg.argmax(1).tolist()]
    return out


def accuracy_on_fresh_images(model, n=2000, seed=12345):
    """Accuracy per attribute on newly drawn examples (same mix as training, unseen seed)."""
    images, labels = make_dataset(n, seed)
    predicted = classify(model, images)
    result = {}
    for key, lb, classes in zip(predicted, labels, (SHAPE_CLASSES, COLOUR_CLASSES, TEXTURE_CLASSES)):
        pred = torch.tensor([classes.index(p) for p in predicted[key]])
        valid = lb != IGNORE
        result[key] = (pred[valid] == lb[valid]).float().mean().item()
    return result


def confusion_matrices(model, n=2000, seed=12345):
    """Per attribute, counts[true class][predicted class] on newly drawn examples."""
    images, labels = make_dataset(n, seed)
    predicted = classify(model, images)
    matrices = {}
    for key, lb, classes in zip(predicted, labels, (SHAPE_CLASSES, COLOUR_CLASSES, TEXTURE_CLASSES)):
        counts = {t: {p: 0 for p in classes} for t in classes}
        for true, pred in zip(lb.tolist(), predicted[key]):
            if true != IGNORE:
                counts[classes[true]][pred] += 1
        matrices[key] = counts
    return matrices


def save_judge(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_judge(path=world.DEFAULT_JUDGE_PATH):
    """Load a trained judge (the shipped one by default), in eval mode."""
    model = JudgeNet()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
