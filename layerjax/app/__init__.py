"""The web app (`python -m layerjax.app --model MODEL`): `session` is what it does for one
user, `__main__` the Gradio page."""
