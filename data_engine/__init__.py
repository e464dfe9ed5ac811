"""ADD, the agent-driven data engine: photos -> layered samples, and new exact scenes."""
