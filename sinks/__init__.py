"""LeadStream sinks."""
