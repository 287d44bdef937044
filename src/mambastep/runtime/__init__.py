"""Running a model: choosing tokens (sampling), generating text (generation), and live
streams that can be checkpointed, rolled back, forked and saved (session, stream)."""
