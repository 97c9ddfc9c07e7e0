"""Writes examples/quickstart.ipynb (its cells, without outputs), so the notebook's source is reviewable as
code; `--run` executes it with nbclient from the repository root and stores the outputs (what GitHub shows).
tests/test_notebook.py executes the same notebook in a fresh kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"

CELLS = [
    new_markdown_cell(
        "# imgtune quick start\n\n"
        "Fine-tune the offline-pretrained EfficientNet-Lite0 on a small slice of the real Fashion-MNIST, look at "
        "the curves and the confusion matrix, classify an image held in memory, and see where the model looked. "
        "Runs on a laptop CPU in a minute or two."
    ),
    new_code_cell(
        "import os\n"
        "from pathlib import Path\n\n"
        "import imgtune\n"
        "from imgtune.sources import write_fashion_mnist\n\n"
        "# 50 training and 20 validation images per class, and the official 10,000 test images, as PNG folders\n"
        "# (Debian's dataset-fashion-mnist when installed, else torchvision's downloader)\n"
        'DATA = Path(os.environ.get("QUICKSTART_DATA", "data/fashion-mnist-small"))\n'
        "write_fashion_mnist(DATA, per_class=50, valid_per_class=20, download=True)"
    ),
    new_markdown_cell(
        "Every config key is a keyword (`epochs`, `img_size`, `lr`, `smoothing`, ...; `docs/options.md` lists "
        "them). In a notebook the run prints one line per epoch."
    ),
    new_code_cell("result = imgtune.train(DATA, img_size=40, epochs=3)"),
    new_code_cell("result.plot()  # loss and accuracy per epoch; the dashed line is where fine-tuning starts"),
    new_code_cell(
        'print(f"test accuracy {result.test.accuracy:.3f} on {result.test.n} images; report: {result.report}")\n'
        "result.history[-1]  # the last metrics row"
    ),
    new_code_cell(
        'from IPython.display import Image as Show\n\nShow(filename=result.run_dir / "plots" / "confusion_matrix.png")'
    ),
    new_markdown_cell(
        "The predictor takes paths, PIL images, NumPy arrays and tensors, and answers like a Hugging Face "
        "pipeline: `[{label, score}, ...]` per image."
    ),
    new_code_cell(
        "from PIL import Image\n\n"
        'photo = Image.open(sorted((DATA / "test" / "Sneaker").glob("*.png"))[0])\n'
        "predictor = imgtune.load(result.run_dir)\n"
        "predictor(photo, top_k=3)"
    ),
    new_markdown_cell("Where did it look? Grad-CAM over the photo:"),
    new_code_cell(
        "from imgtune.explain import overlay\n"
        "from imgtune.images import load_rgb\n\n"
        "(explanation,), skipped = predictor.explain([photo.filename])\n"
        "overlay(load_rgb(photo.filename), explanation, side=192)"
    ),
]


def main() -> None:
    notebook = new_notebook(cells=CELLS, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })  # fmt: skip
    if "--run" in sys.argv[1:]:
        from nbclient import NotebookClient

        client = NotebookClient(
            notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        client.execute()
    nbformat.write(notebook, NOTEBOOK)
    print(NOTEBOOK)


if __name__ == "__main__":
    main()
