from plpost.data.chat import ChatDataModule
from plpost.data.collate import ChatBatch
from plpost.data.feedback import FeedbackBatch, FeedbackDataModule
from plpost.data.formats import DataValidationError
from plpost.data.preference import PreferenceBatch, PreferenceDataModule
from plpost.data.prompts import PromptBatch, PromptDataModule
from plpost.data.sources import DataSource

__all__ = [
    "ChatBatch",
    "ChatDataModule",
    "DataSource",
    "DataValidationError",
    "FeedbackBatch",
    "FeedbackDataModule",
    "PreferenceBatch",
    "PreferenceDataModule",
    "PromptBatch",
    "PromptDataModule",
]
