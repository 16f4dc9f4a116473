"""One router per resource; api.app assembles them."""
