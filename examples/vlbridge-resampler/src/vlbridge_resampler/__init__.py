"""vlbridge-resampler: a Perceiver-resampler connector for vlbridge."""
