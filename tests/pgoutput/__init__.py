"""pgoutput decoder tests: fixtures captured from real servers, live captures, fuzzing."""
