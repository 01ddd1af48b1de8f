// The API's Entra ID application, declared with the Microsoft Graph Bicep extension (infra/bicepconfig.json), when
// the API takes Entra ID tokens (apiEntraAuth). Its app roles say who may do what, and assignment is required: only
// a user, group or service principal assigned a role can get a token for the API at all; the app then checks, on
// every route, that the token's roles allow it (shared/api_roles.py). The person running azd needs the right to
// create app registrations (by default every member of a tenant has it; else Entra's Application Developer role).
extension microsoftGraphV1

@description('Immutable unique name of the app registration (it keys the registration across deployments).')
param uniqueName string
param displayName string
@description('Name of the Function App whose built-in authentication signs browsers in (its default host name).')
param functionAppName string

// The roles' values are what the app checks; their ids are derived from them, so every deployment keeps them.
var roles = [
  {
    value: 'Exports.Admin'
    displayName: 'Exports admin'
    description: 'Change export definitions and connections; everything an operator may do.'
  }
  {
    value: 'Exports.Operator'
    displayName: 'Exports operator'
    description: 'Start, cancel and replay runs; read exports and runs.'
  }
  {
    value: 'Exports.Reader'
    displayName: 'Exports reader'
    description: 'Read exports and runs.'
  }
]
var identifierUri = 'api://${uniqueName}'
// Where Entra ID sends a browser back after sign-in to the console: the app's built-in authentication (Easy Auth).
// If the Flex app ever gets a secure unique default host name (<name>-<hash>.<region>.azurewebsites.net) instead of
// <name>.azurewebsites.net, this must follow it, or every browser sign-in ends on Entra ID's redirect URI mismatch.
var signInCallback = 'https://${functionAppName}.azurewebsites.net/.auth/login/aad/callback'

resource api 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  signInAudience: 'AzureADMyOrg'
  identifierUris: [
    identifierUri
  ]
  api: {
    requestedAccessTokenVersion: 2
  }
  // A browser's sign-in to the console. Easy Auth has no client secret here, so it signs browsers in with the
  // implicit id_token (form_post) flow, which the registration must allow; the id_token carries the roles claim
  // of the app roles assigned to the user, so the principal the app reads holds them (the token store stays off).
  web: {
    redirectUris: [
      signInCallback
    ]
    implicitGrantSettings: {
      enableIdTokenIssuance: true
    }
  }
  appRoles: [
    for role in roles: {
      id: guid(uniqueName, role.value)
      value: role.value
      displayName: role.displayName
      description: role.description
      // People, and scripts signed in as service principals (client credentials).
      allowedMemberTypes: [
        'User'
        'Application'
      ]
      isEnabled: true
    }
  ]
}

resource apiPrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: api.appId
  appRoleAssignmentRequired: true
}

output clientId string = api.appId
output identifierUri string = identifierUri
output servicePrincipalId string = apiPrincipal.id
