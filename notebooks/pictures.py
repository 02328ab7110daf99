"""The notebooks' display setting: every PIL picture a cell shows is stored once, as a 256-colour
PNG (PIL would also add a JPEG copy), so that notebooks committed with their outputs stay small.
Not part of the model."""
import io

from PIL import Image


def store_each_picture_once():
    """In Jupyter, show PIL pictures as one compact PNG; outside Jupyter: nothing."""
    try:
        from IPython import get_ipython  # wherever Jupyter runs; not a requirement of the package
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    formatters = shell.display_formatter.formatters
    formatters["image/jpeg"].enabled = False

    def png(image):
        buffer = io.BytesIO()
        image.quantize(256).save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()
    formatters["image/png"].for_type(Image.Image, png)
