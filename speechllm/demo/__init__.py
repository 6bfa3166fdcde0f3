"""`make demo`: the whole recipe on the offline corpus, with self-pretrained stand-ins for hub models."""
