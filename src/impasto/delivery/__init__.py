"""Getting images out and in: encoders, the outbound-URL guard and guarded HTTP fetches."""
