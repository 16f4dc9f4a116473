"""LeadStream schemas."""
