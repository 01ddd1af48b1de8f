#!/bin/sh
# azd runs this after `azd deploy` (azure.yaml hooks): it subscribes the app's Event Grid trigger to the export
# account's model.json writes (infra/app/events.bicep). The subscription names the function, which exists only once
# the code is deployed: that is why this is not part of `azd provision`. azd passes its environment values
# (EXPORT_STORAGE_ACCOUNT_ID, and main.bicep's outputs).
set -eu

if [ -z "${EXPORT_STORAGE_ACCOUNT_ID:-}" ]; then
  echo "EXPORT_STORAGE_ACCOUNT_ID is not set: no Event Grid subscription; runs start on the timer (EXPORT_SCHEDULE)."
  exit 0
fi
subscription=$(echo "$EXPORT_STORAGE_ACCOUNT_ID" | cut -d/ -f3)
group=$(echo "$EXPORT_STORAGE_ACCOUNT_ID" | cut -d/ -f5)
account=$(echo "$EXPORT_STORAGE_ACCOUNT_ID" | cut -d/ -f9)
# An account has at most one system topic: use the one it has, if any.
topic=$(az eventgrid system-topic list --subscription "$subscription" -o tsv \
  --query "[?source=='$EXPORT_STORAGE_ACCOUNT_ID'].name | [0]")
if [ -z "$topic" ]; then
  topic="$account-events"
fi
echo "Subscribing $AZURE_FUNCTION_NAME to model.json writes in $account (Event Grid system topic $topic)"
az deployment group create --subscription "$subscription" --resource-group "$group" \
  --name "$AZURE_FUNCTION_NAME-events" --template-file infra/app/events.bicep --output none \
  --parameters exportStorageAccountName="$account" topicName="$topic" functionAppName="$AZURE_FUNCTION_NAME" \
    functionAppResourceGroup="$AZURE_RESOURCE_GROUP" functionAppSubscriptionId="$AZURE_SUBSCRIPTION_ID"
