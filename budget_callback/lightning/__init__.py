"""The Lightning side: the callback's hooks and the components they call (inputs, locating W, tracing, capture, tracking, W&B)."""
