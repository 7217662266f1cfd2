"""Conversations: prompt building with the end-of-question marker, and the conversation stores."""
