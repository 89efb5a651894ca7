"""Re-create examples/data/chelsea-cat/ from scikit-image's bundled sample photo `chelsea.png`.

The photo (Chelsea the cat, by Stefan van der Walt) ships inside the scikit-image wheel under CC0. Four framings of
it stand in for the "3-10 photos of one subject" a DreamBooth-style concept uses; two aspect ratios exercise the
aspect-ratio buckets. Captions use the trigger word `sks`; a .txt with several lines holds caption variants.

    pip install scikit-image && python examples/data/make_example_data.py
"""

from pathlib import Path

from PIL import Image, ImageOps
from skimage import data

OUT = Path(__file__).resolve().parent / "chelsea-cat"
CROPS = {
    # name: (left, top, right, bottom) in the 451 x 300 original, caption lines
    "chelsea-1.jpg": ((0, 0, 451, 300), ["a photo of sks cat lying on a wooden floor"]),
    "chelsea-2.jpg": ((90, 0, 390, 300), ["a close-up photo of sks cat", "sks cat looking at the camera"]),
    "chelsea-3.jpg": ((130, 10, 330, 300), ["a portrait of sks cat"]),
    "chelsea-4.jpg": ((40, 20, 420, 300), ["a photo of sks cat, mirrored", "sks cat, ginger fur, close-up"]),
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.chelsea())
    for index, (name, (box, captions)) in enumerate(CROPS.items()):
        image = photo.crop(box)
        if index == 3:
            image = ImageOps.mirror(image)
        image.thumbnail((256, 256), Image.Resampling.LANCZOS)
        image.save(OUT / name, quality=90)
        (OUT / name).with_suffix(".txt").write_text("\n".join(captions) + "\n")
        print(f"wrote {OUT / name} {image.size}")


if __name__ == "__main__":
    main()
