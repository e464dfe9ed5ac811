"""Judge rewards for finetuning a decomposer on unlabelled photos (ReasonX, issue 22).

`relations`: questions about a photo that a decomposition answers analytically (is a point on
the object, in its shadow, on a hidden part of it; which object is in front; is the background
free of the object), where to ask them, and the agreement reward. `judges`: who answers them
about the photo: the ground truth of synthetic scenes (offline) or an LLM/VLM agent.
`preference`: the engine's pairwise preference within a group of decompositions as rewards.
"""
