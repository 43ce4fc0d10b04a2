"""Different vocabularies and chat templates: mergekit's tokenizer_source, tokenizer: and chat_template."""
