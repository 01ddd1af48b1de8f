"""The source: reading Customer Insights' CDM exports (cdm_reader), the export definitions and their checks
(export_config, with Ortto's field rules in ortto_fields), and mapping a row to a contact (contacts). Imports nothing
else of shared/.
"""
