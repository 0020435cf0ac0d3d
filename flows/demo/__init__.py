"""The demo: everything `webdistill demo` needs and the product does not, in one package with its
own optional dependencies (`pip install -e '.[demo]'`: mlxtend, scikit-image, and animal-mnist
installed without its dependencies, as `make setup` does).

    run.py      `webdistill demo`: build the inputs, run the pipeline, report against the ground truth
    crawl.py    the demo crawl: real offline images with planted defects, and their ground truth
    sources.py  the offline image sources the crawl draws from (MNIST, Fashion-MNIST, animals, ...)
    teacher.py  the demo teacher: a small CNN trained on MNIST, saved as a user's teacher would be
    clip.py     the demo's small CLIP, trained on the crawl's image-caption pairs

Nothing outside this package imports it, except the CLI's `demo` verb, the tests and the benchmarks
(which build the demo crawl and teacher as their data).
"""
from .run import run_demo

__all__ = ["run_demo"]
