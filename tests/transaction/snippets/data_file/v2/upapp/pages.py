from importlib import resources
from pathlib import Path


def page():
    return resources.files("upapp").joinpath("templates/page.html").read_text()


def page_beside_me():
    return (Path(__file__).parent / "templates" / "page.html").read_text()
