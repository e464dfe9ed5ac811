"""Training the layer decomposer: objectives, the flow sampler, evaluation and the loop."""
