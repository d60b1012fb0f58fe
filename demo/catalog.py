"""A synthetic fashion catalog: procedurally drawn products with a styles.csv, no download needed.

The layout is the real fashion set's: `styles.csv` with its ten columns and
`images/<id>.jpg`. Each product is a simple drawing of its article type
(t-shirt, dress, jeans, shoe, bag, watch, cap, sunglasses, backpack, skirt)
in its base colour with a pattern, on a light studio background, slightly
moved, scaled and turned, so that look-alikes exist but no two are equal.

    python -m demo.catalog OUT_DIR [--count 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from indexer.sources import STYLES_COLUMNS

WIDTH, HEIGHT = 300, 400

COLOURS = {
    "Black": (30, 30, 32), "White": (238, 238, 236), "Red": (200, 30, 40), "Blue": (40, 90, 210),
    "Navy Blue": (25, 35, 90), "Green": (40, 150, 70), "Yellow": (235, 200, 40),
    "Pink": (235, 130, 170), "Grey": (128, 128, 132), "Brown": (120, 75, 40),
    "Purple": (120, 60, 150), "Orange": (240, 130, 30),
}  # fmt: skip
PATTERNS = ("Solid", "Striped", "Polka Dot", "Checked")
BRANDS = ("Northwind", "Lumen", "Atlas", "Corvo", "Maple & Co", "Brisa")


@dataclass(frozen=True)
class Article:
    article_type: str
    master_category: str
    sub_category: str
    genders: tuple[str, ...]
    usage: str


ARTICLES = (
    Article("Tshirts", "Apparel", "Topwear", ("Men", "Women", "Unisex"), "Casual"),
    Article("Dresses", "Apparel", "Dress", ("Women",), "Casual"),
    Article("Jeans", "Apparel", "Bottomwear", ("Men", "Women"), "Casual"),
    Article("Skirts", "Apparel", "Bottomwear", ("Women",), "Casual"),
    Article("Casual Shoes", "Footwear", "Shoes", ("Men", "Women"), "Casual"),
    Article("Handbags", "Accessories", "Bags", ("Women",), "Casual"),
    Article("Backpacks", "Accessories", "Bags", ("Unisex",), "Sports"),
    Article("Watches", "Accessories", "Watches", ("Men", "Women"), "Formal"),
    Article("Caps", "Accessories", "Headwear", ("Unisex",), "Sports"),
    Article("Sunglasses", "Accessories", "Eyewear", ("Men", "Women", "Unisex"), "Casual"),
)


def _outline(article_type: str) -> list[list[tuple[float, float]]]:
    """Polygons of the article's silhouette in a unit box (0..1, 0..1)."""
    shapes = {
        "Tshirts": [
            [
                (0.30, 0.12),
                (0.42, 0.10),
                (0.50, 0.16),
                (0.58, 0.10),
                (0.70, 0.12),
                (0.92, 0.30),
                (0.80, 0.40),
                (0.72, 0.33),
                (0.72, 0.90),
                (0.28, 0.90),
                (0.28, 0.33),
                (0.20, 0.40),
                (0.08, 0.30),
            ]
        ],
        "Dresses": [
            [
                (0.40, 0.08),
                (0.44, 0.08),
                (0.46, 0.20),
                (0.54, 0.20),
                (0.56, 0.08),
                (0.60, 0.08),
                (0.62, 0.30),
                (0.58, 0.42),
                (0.86, 0.92),
                (0.14, 0.92),
                (0.42, 0.42),
                (0.38, 0.30),
            ]
        ],
        "Jeans": [
            [
                (0.30, 0.08),
                (0.70, 0.08),
                (0.74, 0.92),
                (0.56, 0.92),
                (0.50, 0.35),
                (0.44, 0.92),
                (0.26, 0.92),
            ]
        ],
        "Skirts": [[(0.34, 0.25), (0.66, 0.25), (0.84, 0.78), (0.16, 0.78)]],
        "Casual Shoes": [
            [
                (0.10, 0.55),
                (0.30, 0.50),
                (0.45, 0.38),
                (0.60, 0.40),
                (0.66, 0.52),
                (0.90, 0.60),
                (0.92, 0.70),
                (0.10, 0.70),
            ]
        ],
        "Handbags": [
            [(0.20, 0.40), (0.80, 0.40), (0.86, 0.82), (0.14, 0.82)],
            [
                (0.32, 0.40),
                (0.36, 0.22),
                (0.64, 0.22),
                (0.68, 0.40),
                (0.62, 0.40),
                (0.59, 0.28),
                (0.41, 0.28),
                (0.38, 0.40),
            ],
        ],
        "Backpacks": [
            [(0.26, 0.22), (0.74, 0.22), (0.80, 0.88), (0.20, 0.88)],
            [(0.36, 0.50), (0.64, 0.50), (0.66, 0.78), (0.34, 0.78)],
        ],
        "Watches": [[(0.44, 0.05), (0.56, 0.05), (0.56, 0.95), (0.44, 0.95)]],
        "Caps": [
            [
                (0.20, 0.60),
                (0.25, 0.40),
                (0.38, 0.30),
                (0.62, 0.30),
                (0.75, 0.40),
                (0.80, 0.60),
                (0.95, 0.64),
                (0.95, 0.68),
                (0.20, 0.68),
            ]
        ],
        "Sunglasses": [
            [(0.10, 0.42), (0.44, 0.42), (0.42, 0.60), (0.14, 0.60)],
            [(0.56, 0.42), (0.90, 0.42), (0.86, 0.60), (0.58, 0.60)],
            [(0.44, 0.44), (0.56, 0.44), (0.56, 0.47), (0.44, 0.47)],
        ],
    }
    return shapes[article_type]


def draw_product(
    article: Article, colour: tuple[int, int, int], pattern: str, rng: random.Random
) -> Image.Image:
    """One product photo: the silhouette, filled with colour and pattern, on a studio background."""
    background = tuple(rng.randint(236, 252) for _ in range(3))
    image = Image.new("RGB", (WIDTH, HEIGHT), background)
    scale = rng.uniform(0.75, 0.95)
    dx, dy = rng.uniform(-0.06, 0.06), rng.uniform(-0.05, 0.05)
    fill = Image.new("RGB", (WIDTH, HEIGHT), colour)
    _paint_pattern(fill, colour, pattern, rng)
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    draw = ImageDraw.Draw(mask)
    for polygon in _outline(article.article_type):
        points = [
            (WIDTH * (0.5 + (x - 0.5) * scale + dx), HEIGHT * (0.5 + (y - 0.5) * scale + dy))
            for x, y in polygon
        ]
        draw.polygon(points, fill=255)
    if article.article_type == "Watches":
        cx, cy, r = WIDTH * (0.5 + dx), HEIGHT * (0.5 + dy), WIDTH * 0.16 * scale
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    shadow = mask.filter(ImageFilter.GaussianBlur(8)).point(lambda v: v * 0.35)
    image.paste((150, 150, 150), (6, 8), shadow)
    image.paste(fill, (0, 0), mask)
    if article.article_type == "Watches":
        face = ImageDraw.Draw(image)
        face.ellipse((cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8), fill=(245, 245, 240))
        angle = rng.uniform(0, 2 * math.pi)
        face.line(
            (cx, cy, cx + r * 0.6 * math.cos(angle), cy + r * 0.6 * math.sin(angle)),
            fill=(20, 20, 20),
            width=3,
        )
    angle = rng.uniform(-8, 8)
    return image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=background)


def _paint_pattern(
    fill: Image.Image, colour: tuple[int, int, int], pattern: str, rng: random.Random
) -> None:
    accent = tuple(255 - c if sum(colour) < 380 else max(0, c - 110) for c in colour)
    draw = ImageDraw.Draw(fill)
    step = rng.randint(14, 26)
    if pattern == "Striped":
        for y in range(0, HEIGHT, step):
            draw.rectangle((0, y, WIDTH, y + step // 3), fill=accent)
    elif pattern == "Polka Dot":
        for y in range(0, HEIGHT, step):
            for x in range((y // step % 2) * step // 2, WIDTH, step):
                draw.ellipse((x, y, x + step // 3, y + step // 3), fill=accent)
    elif pattern == "Checked":
        for y in range(0, HEIGHT, step):
            for x in range(0, WIDTH, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step, y + step), fill=accent)


def generate(out_dir: Path, count: int = 300, seed: int = 0, quality: int = 90) -> Path:
    """Write out_dir/styles.csv and out_dir/images/<id>.jpg for `count` products."""
    rng = random.Random(seed)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    colour_names = list(COLOURS)
    rows = []
    for index in range(count):
        article = ARTICLES[index % len(ARTICLES)]
        colour_name = colour_names[(index // len(ARTICLES)) % len(colour_names)]
        pattern = PATTERNS[(index // (len(ARTICLES) * len(colour_names))) % len(PATTERNS)]
        if rng.random() < 0.3:
            pattern = rng.choice(PATTERNS)
        product_id = str(10000 + index)
        gender = rng.choice(article.genders)
        name = f"{rng.choice(BRANDS)} {gender} {colour_name} {pattern} {article.article_type}"
        season = rng.choice(("Summer", "Winter", "Fall", "Spring"))
        rows.append([
            product_id, gender, article.master_category, article.sub_category, article.article_type,
            colour_name, season, rng.randint(2011, 2019), article.usage, name,
        ])  # fmt: skip
        picture = draw_product(article, COLOURS[colour_name], pattern, rng)
        picture.save(images / f"{product_id}.jpg", "JPEG", quality=quality)
    with (out_dir / "styles.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(STYLES_COLUMNS)
        writer.writerows(rows)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.catalog", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out_dir, args.count, args.seed)
    print(f"wrote {args.count} products to {args.out_dir} (styles.csv, images/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
